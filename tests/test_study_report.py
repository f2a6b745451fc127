"""The study's report: the paired table is each method minus random masking on the same seed."""

from __future__ import annotations

from pathlib import Path
from study_scripts import load_study_script

ROOT = Path(__file__).resolve().parents[1]


def load_run_study():
    return load_study_script("run_study")


def run(seed, linear, minutes):
    return {"seed": seed, "eval": {"linear_top1": linear, "linear_pixels_top1": 80.0},
            "train_minutes": minutes}


def test_paired_differences_match_seeds_and_skip_unpaired_ones():
    rs = load_run_study()
    rs.STUDY["methods"] = {"mae_random": {}, "mlomae": {}}
    rows = {"mae_random": [run(0, 85.0, 10.0), run(1, 84.0, 10.0)],
            # seed 2 has no random-mask partner yet: left out
            "mlomae": [run(0, 86.0, 20.0), run(1, 84.0, 30.0), run(2, 99.0, 1.0)]}
    table = rs.paired(rows, {"linear_top1": "linear", "linear_pixels_top1": "raw pixels"})
    line = [x for x in table.splitlines() if x.startswith("| mlomae |")][0]
    # differences +1.0 and 0.0: mean +0.50, sample std 0.71; time ratios 2 and 3: 2.50 ± 0.71
    assert line == "| mlomae | 2 | +0.50 ± 0.71 | 2.50 ± 0.71 |"
    assert "raw pixels" not in table


def test_study_runs_each_run_in_a_child_and_resumes_after_a_kill(tmp_path):
    """Each run trains in a process of its own: a run SIGKILLed after outer step 6 (fault
    injection in the child) stops the study with exit 137 and the later run not started; the
    same command then resumes the killed run from its checkpoint at step 5 and ends with the
    metrics of a study never interrupted (20 outer steps of 5 lower steps, every logged number
    equal), then runs the second. An unknown method exits 2 naming it; a record-only method is
    skipped by the whole study and refused by name."""
    import json
    import os
    import subprocess
    import sys
    study = {"runs": str(tmp_path / "runs"), "plots": str(tmp_path / "plots"),
             "results": str(tmp_path / "results"),
             "experiment": "study-test", "baseline": "a", "seeds": [0],
             "pretrain_steps": 100, "pretrain_problem": "regression", "log_every": 5,
             "checkpoint_every": 5, "model": {}, "overrides": ["tracking.enabled=false"],
             "methods": {"a": {"experiment": "experiments/toy_bilevel.yaml"},
                         "b": {"experiment": "experiments/toy_bilevel.yaml",
                               "overrides": ["hypergrad.method=darts"]},
                         "c": {"experiment": "experiments/toy_bilevel.yaml",
                               "record_only": "trained by older code"}},
             "evaluation": [], "report_metrics": {}}
    path = tmp_path / "study.yaml"
    path.write_text(json.dumps(study))
    script = str(ROOT / "benchmarks/study/run_study.py")

    def go(*extra, fault=None):
        env = {k: v for k, v in os.environ.items() if k != "MLOMAE_FAULT"}
        if fault:
            env["MLOMAE_FAULT"] = fault
        return subprocess.run([sys.executable, script, "--study", str(path), *extra],
                              capture_output=True, text=True, env=env, cwd=ROOT)

    def records(run):
        lines = (tmp_path / "runs" / run / "metrics.jsonl").read_text().splitlines()
        return [{k: v for k, v in json.loads(x).items() if k != "time" and not k.endswith("seconds")}
                for x in lines]

    r = go("--methods", "a,nope")
    assert r.returncode == 2 and "no method 'nope'" in r.stderr and "Traceback" not in r.stderr
    r = go("--methods", "a,b", fault="kill-after-step:6")
    assert r.returncode == 137, r.stdout + r.stderr
    assert not (tmp_path / "runs" / "b-s0").exists()
    r = go("--methods", "a,b")
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert "(resuming)" in r.stdout
    resumed = records("a-s0")
    assert [x["step"] for x in resumed if "step" in x][-1] == 20
    # each finished run left its record: what its summary says, and the study's own count
    summary = json.loads((tmp_path / "runs" / "b-s0" / "summary.json").read_text())
    kept = json.loads((tmp_path / "results" / "b-s0.json").read_text())
    assert summary["status"] == "FINISHED" and kept["status"] == "FINISHED"
    assert (kept["method"], kept["seed"], kept["outer_steps"]) == ("b", 0, 20)
    assert kept["problem_steps"] == summary["problem_steps"] and kept["problem_steps"]["regression"] == 100
    assert kept["final_metrics"] == {k: v for k, v in summary["final_metrics"].items()
                                     if isinstance(v, (int, float))}
    assert kept["train_minutes"] == summary["train_seconds"] / 60
    # a new clone holds the records and no run folders: nothing is trained again
    os.rename(tmp_path / "runs", tmp_path / "runs-killed")
    r = go("--methods", "a,b")
    assert r.returncode == 0 and "finished (" in r.stdout and not (tmp_path / "runs").exists()
    # with its record deleted, a run trains again, from scratch, to the same numbers
    os.remove(tmp_path / "results" / "a-s0.json")
    assert go("--methods", "a").returncode == 0
    assert records("a-s0") == resumed
    # a record-only method is never trained: skipped by the whole study, an error when named
    assert go().returncode == 0 and not (tmp_path / "runs" / "c-s0").exists()
    r = go("--methods", "a,c")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "method 'c' is kept as a record only, not trained again: trained by older code" in r.stderr


def test_write_results_replaces_only_the_marked_block(tmp_path):
    """The table lands between the study's two markers; text around them is kept byte for byte;
    a file without them is left untouched and named in the error."""
    import pytest
    rs = load_run_study()
    rs.STUDY["experiment"] = "masking"
    md = tmp_path / "R.md"
    md.write_text("# R\n\nbefore\n<!-- study: masking -->\nold table\n<!-- /study: masking -->\nafter\n")
    rs.write_results(md, "| new |")
    assert md.read_text() == ("# R\n\nbefore\n<!-- study: masking -->\n| new |\n"
                              "<!-- /study: masking -->\nafter\n")
    bare = tmp_path / "bare.md"
    bare.write_text("nothing here\n")
    with pytest.raises(SystemExit, match="bare.md"):
        rs.write_results(bare, "| new |")
    assert bare.read_text() == "nothing here\n"


def test_every_study_method_loads_with_the_stated_schedule():
    """Each method of the masking study and of its variants file loads and builds its graph;
    the pretraining steps per outer step are the ones the files state (4 for the methods without
    a masker and the repaired masker, 8 for the unrolled horizon, MLO-MAE's published 2, AutoMAE's
    1), so 18,750 pretraining steps are the same 40 epochs for all. The alias-nested override
    lists are flattened."""
    from mlomae.config import load
    rs = load_run_study()
    want = {"masking": {"random": 4, "random_throw": 4, "object_prior": 4, "amt": 4, "hpm": 4, "pixel_guided": 4,
                        "automae": 1, "automae_frozen": 1, "mlomae": 2, "mlomae_repaired": 4,
                        "mlomae_repaired_adversarial": 4, "mlomae_repaired_unheld": 4,
                        "mlomae_repaired_adversarial_unheld": 4},
            "variants": {"darts_k4": 4, "unroll_k8": 8, "unroll_k8_prior": 8, "sama_k4": 4, "sama_k4_exact_head": 4,
                         "darts_k4_held": 4, "darts_k4_fine": 4,
                         "darts_k4_regularised": 4}}
    for study, methods in want.items():
        rs.use_study(ROOT / f"benchmarks/study/{study}.yaml")
        assert list(rs.STUDY["methods"]) == list(methods)
        for m, per in methods.items():
            ov = rs.overrides(m, 0)
            assert all(isinstance(o, str) for o in ov)
            cfg = load(ROOT / rs.STUDY["methods"][m]["experiment"], ov)
            assert rs.pretrain_per_outer(cfg) == per, (study, m)


def test_report_reads_the_kept_records_and_names_each_machine(tmp_path):
    """The tables come from the records in the results folder, sorted by seed; with runs from
    two machines, the report says which machine trained which run."""
    import json
    rs = load_run_study()
    rs.STUDY.update({"methods": {"mae_random": {}, "mlomae": {}}, "baseline": "mae_random",
                     "report_metrics": {"linear_top1": "linear"}})
    rs.RESULTS = tmp_path
    for name, seed, lin, machine in [("mae_random", 1, 84.0, "A"), ("mae_random", 0, 85.0, "A"),
                                     ("mlomae", 0, 86.5, "B")]:
        (tmp_path / f"{name}-s{seed}.json").write_text(json.dumps(
            {"method": name, "seed": seed, "status": "FINISHED", "eval": {"linear_top1": lin},
             "train_minutes": 10.0, "machine": machine}))
    rows = rs.records.collect(rs.RESULTS)
    assert [r["seed"] for r in rows["mae_random"]] == [0, 1]
    table = rs.report()
    assert "| mae_random | 2 | 84.50 ± 0.71 | 10.00 ± 0.00 | – |" in table
    assert "Trained on A: mae_random-s0, mae_random-s1; B: mlomae-s0." in table
    # no mae_random run on B: mlomae-s0 has a paired difference but no time ratio
    assert "| mlomae | 1 | +1.50 | – |" in table


def test_time_ratio_divides_by_the_baselines_mean_on_the_same_machine():
    """Times compare within a machine only: each run's minutes over the mean of the baseline's
    runs on its machine (A: 40 and 50, mean 45; B: 90), whatever their seeds."""
    rs = load_run_study()
    rs.STUDY["methods"] = {"mae_random": {}, "mlomae": {}}

    def on(machine, seed, minutes):
        return {**run(seed, 85.0, minutes), "machine": machine}
    rows = {"mae_random": [on("A", 0, 40.0), on("A", 1, 50.0), on("B", 2, 90.0)],
            "mlomae": [on("A", 0, 90.0), on("B", 1, 180.0), on("B", 2, 135.0)]}
    table = rs.paired(rows, {"linear_top1": "linear"})
    line = [x for x in table.splitlines() if x.startswith("| mlomae |")][0]
    # ratios 90/45 = 2.0, 180/90 = 2.0, 135/90 = 1.5: mean 1.83, sample std 0.29
    assert line == "| mlomae | 3 | +0.00 ± 0.00 | 1.83 ± 0.29 |"


def test_a_run_another_method_reads_is_exported_as_soon_as_it_finishes(tmp_path, monkeypatch):
    """``export_before: RUN`` (AutoMAE's frozen generator): RUN's encoder is written into the
    results' encoders folder when RUN finishes, once, with ``mlomae export`` (here its writer
    on a tiny MAE); its sidecar leaves RUN's record as it was and the study's table still
    counts RUN; a run nobody reads is not exported, and an export already kept is not written
    again."""
    import json
    from mlomae.eval.export import export_timm, load_timm
    from mlomae.models.mae import MaskedAutoencoder
    rs = load_run_study()
    rs.STUDY.update({"methods": {"random": {}, "frozen": {"export_before": "random-s1"}},
                     "baseline": "random", "report_metrics": {"linear_top1": "linear"}})
    rs.RUNS, rs.RESULTS = tmp_path / "runs", tmp_path / "results"
    (rs.RUNS / "random-s1").mkdir(parents=True)
    (rs.RUNS / "random-s1" / "summary.json").write_text(json.dumps({"status": "FINISHED"}))
    rs.RESULTS.mkdir()
    record = json.dumps({"method": "random", "seed": 1, "status": "FINISHED",
                         "eval": {"linear_top1": 88.0}, "train_minutes": 40.0, "machine": "A"})
    (rs.RESULTS / "random-s1.json").write_text(record)
    calls = []

    def fake_run(cmd, check, cwd):
        calls.append(cmd)
        export_timm(MaskedAutoencoder(28, 4, 1, 32, 2, 4, 32, 1, 4), cmd[cmd.index("--out") + 1])
    monkeypatch.setattr(rs.subprocess, "run", fake_run)
    rs.export_for_others("random-s0")
    assert calls == []
    rs.export_for_others("random-s1")
    assert len(calls) == 1
    assert calls[0][1:4] == ["-m", "mlomae", "export"]
    assert calls[0][4] == str(rs.RUNS / "random-s1")
    out = rs.RESULTS / "encoders" / "random-s1.safetensors"
    assert calls[0][-1] == str(out)
    assert load_timm(out).embed_dim == 32
    assert (rs.RESULTS / "random-s1.json").read_text() == record
    assert [r["seed"] for r in rs.records.collect(rs.RESULTS)["random"]] == [1]
    rs.export_for_others("random-s1")
    assert len(calls) == 1


def test_fashion_mnist_yaml_is_the_studys_repaired_run():
    """`mlomae run experiments/fashion_mnist.yaml` trains what the study's `mlomae_repaired` trained
    (the best learned configuration on `mask`): the same models, problems, data and trainer,
    18750 // 4 outer steps; only the run's name, tracking and evaluations differ."""
    from mlomae.config import load
    rs = load_run_study()
    rs.use_study(ROOT / "benchmarks/study/masking.yaml")
    spec = rs.STUDY["methods"]["mlomae_repaired"]
    study = load(ROOT / spec["experiment"], rs.overrides("mlomae_repaired", 0)
                 + [f"trainer.steps={rs.STUDY['pretrain_steps'] // 4}"]).data
    ours = load(ROOT / "experiments/fashion_mnist.yaml").data
    for key in ("models", "problems", "data", "dependencies", "hypergrad"):
        assert ours[key] == study[key], key
    assert ours["trainer"]["steps"] == 4687
    assert ours["trainer"] == study["trainer"]
    assert ours["seed"] == study["seed"] == 0


def test_a_record_keeps_training_time_alone_and_its_first_machine_and_date(tmp_path):
    """records.save: train_seconds 1500 -> 25.0 minutes (not the 1800 s wall time, which counts
    the evaluations); the heat map is copied beside the record; re-saving after a later
    evaluation keeps the machine and date of the first record and takes the new evaluation; the
    commits that trained the run are copied."""
    import json
    rs = load_run_study()
    rd, results = tmp_path / "runs" / "random-s2", tmp_path / "results"
    (rd / "pictures").mkdir(parents=True)
    (rd / "pictures" / "mask_heatmap.png").write_bytes(b"png")
    summary = {"status": "FINISHED", "train_seconds": 1500.0, "wall_time_seconds": 1800.0,
               "eval": {"linear_top1": 88.33}, "final_metrics": {"pretrain/loss": 0.5, "note": "x"},
               "outer_steps": 4687, "problem_steps": {"pretrain": 18748}, "precision": "bf16",
               "code": [None, "0123456789ab"]}
    rec = rs.records.save(rd, summary, results)
    assert (rec["method"], rec["seed"], rec["train_minutes"]) == ("random", 2, 25.0)
    assert rec["code"] == [None, "0123456789ab"]
    assert rec["final_metrics"] == {"pretrain/loss": 0.5}
    assert (results / "random-s2-heatmap.png").read_bytes() == b"png"
    kept = json.loads((results / "random-s2.json").read_text())
    assert kept == rec
    kept.update(machine="the first machine", date="2026-12-01")
    (results / "random-s2.json").write_text(json.dumps(kept))
    again = rs.records.save(rd, {**summary, "eval": {"linear_top1": 88.33, "knn_top1": 87.3}},
                            results)
    assert (again["machine"], again["date"]) == ("the first machine", "2026-12-01")
    assert again["eval"] == {"linear_top1": 88.33, "knn_top1": 87.3}
    assert rs.records.collect(results) == {"random": [again]}
