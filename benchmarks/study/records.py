"""What a finished study run leaves behind, kept apart from its folder: RESULTS/METHOD-sSEED.json
(its evaluations, final metrics, training minutes, the machine that trained it and the date)
beside its mask heat map, small enough to commit, so a study that takes many days survives a
new clone. The tables of run_study.py are made from these records alone."""

from __future__ import annotations

import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def machine() -> str:
    """This machine in a few words (the benchmarks' own description): CPU, cores, bf16 units."""
    sys.path.insert(0, str(HERE.parent))
    import common
    m = common.machine(threads=0)
    return f"{m['cpu']}, {m['nproc']} cores ({m['cpu_flags']})"


def train_minutes(summary: dict, rd: Path) -> float:
    """Training time alone (no evaluation): the summary's train_seconds, or the wall time saved
    in the run's final checkpoint (taken when training ended)."""
    if summary.get("train_seconds"):
        return summary["train_seconds"] / 60
    from mlomae import checkpoint
    found = checkpoint.load_latest(rd / "checkpoints")
    if found is not None and "wall_time" in found[1]:
        return float(found[1]["wall_time"]) / 60
    return summary["wall_time_seconds"] / 60


def save(rd: Path, summary: dict, results: Path) -> dict:
    """Keep what the tables read from the finished run in ``rd`` as results/NAME.json (and its
    mask heat map as results/NAME-heatmap.png), written whole or not at all. The machine and
    date of a record already there are kept (a later evaluation does not retrain)."""
    import datetime
    import shutil
    from mlomae.tracking import atomic_write_text
    method, seed = rd.name.rsplit("-s", 1)
    path = results / f"{rd.name}.json"
    old = json.loads(path.read_text()) if path.exists() else {}
    rec = {"method": method, "seed": int(seed), "status": "FINISHED",
           "eval": summary.get("eval") or {},
           "final_metrics": {k: v for k, v in (summary.get("final_metrics") or {}).items()
                             if isinstance(v, (int, float))},
           "train_minutes": train_minutes(summary, rd),
           "outer_steps": summary.get("outer_steps"), "problem_steps": summary.get("problem_steps"),
           "precision": summary.get("precision"), "code": summary.get("code"),
           "machine": old.get("machine") or machine(),
           "date": old.get("date") or datetime.date.today().isoformat()}
    results.mkdir(parents=True, exist_ok=True)
    heat = rd / "pictures" / "mask_heatmap.png"
    if heat.exists():
        shutil.copyfile(heat, results / f"{rd.name}-heatmap.png")
    atomic_write_text(path, json.dumps(rec, indent=1, sort_keys=True) + "\n")
    return rec


def sync(runs: Path, results: Path) -> None:
    """A record for every finished run folder in ``runs`` that has none, or an older one."""
    for rd in sorted(runs.glob("*-s*")):
        s = rd / "summary.json"
        if s.exists() and json.loads(s.read_text()).get("status") == "FINISHED":
            rec = results / f"{rd.name}.json"
            if not rec.exists() or rec.stat().st_mtime < s.stat().st_mtime:
                save(rd, json.loads(s.read_text()), results)


def collect(results: Path) -> dict:
    """The study's finished runs, from their records: {method: [record, ...]} by seed."""
    rows: dict = {}
    for path in sorted(results.glob("*-s*.json")):
        d = json.loads(path.read_text())
        if d.get("status") == "FINISHED":
            rows.setdefault(d["method"], []).append(d)
    for found in rows.values():
        found.sort(key=lambda r: r["seed"])
    return rows
