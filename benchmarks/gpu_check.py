"""GPU check: what the CPU test suite cannot show, in one script (``make gpu-check``).

On a CUDA machine it

1. runs the suite's CUDA tests (``pytest -m cuda tests/test_cuda.py``): device placement of
   every problem, batch and checkpoint, CUDA -> CPU checkpoint load, attention switching for
   second-order methods, the non-finite guard;
2. runs ``torchrun --nproc_per_node=1`` (NCCL with ``trainer.device=cuda``) on
   experiments/toy_bilevel.yaml and experiments/quickstart.yaml for a few outer steps and
   checks the step counts in their summary.json;
3. measures MAE pretraining throughput (images/s) at ViT-B/16, 224 px, of the engine against a
   hand-written loop of the same model, optimizer and random masks, in bf16 and fp32, on
   synthetic ImageNet-shaped images (``synthetic_imagenet``) held on the device; and the
   MLO-MAE cycle (experiments/imagenet.yaml, darts, its batch of 256 per process) as the
   builder makes it: seconds per outer step and peak memory;
4. prints one table and writes it with every number as JSON (``--out``, default
   benchmarks/results/gpu_check.json; ``gpu_check-dry.json`` for a dry run).

``--dry-run`` (automatic without CUDA, and said so) runs the same code paths on the CPU at tiny
sizes: a ViT of embed 64 / depth 2 at 32 px, batch 2, 2 steps, torchrun with gloo, the CUDA
tests reported as skipped; well under a minute. tests/test_gpu_check.py runs it.

The device is chosen the way a user chooses it, by config (``trainer.device``), and passed to
the hand-written loop as the same value. At one process mlomae creates no process group
(WORLD_SIZE 1), so step 2 checks the torchrun launch, the device and the counts, not NCCL's
collectives; ``--nproc N`` (N GPUs) runs N processes, which does. Steps 1 and 2 live in
benchmarks/gpu_subprocess.py.

    python benchmarks/gpu_check.py [--dry-run] [--out FILE] [--steps N] [--nproc N]
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

import common
from common import Cycle
from gpu_subprocess import finish_cuda_tests, finish_torchrun, start_cuda_tests, start_torchrun

REPO = common.ROOT.parent
EXPERIMENTS = REPO / "experiments"


@dataclass(frozen=True)
class Size:
    img: int
    patch: int
    embed: int
    depth: int
    heads: int
    dec_embed: int
    dec_depth: int
    dec_heads: int
    masker_hidden: int
    batch: int            # MAE throughput batch; the MLO-MAE cycle uses the experiment's
    cycle_batch: int | None  # None: imagenet.yaml's own data.batch_size
    steps: int            # timed steps (throughput) and outer steps (cycle, torchrun)
    warmup: int
    n_batches: int        # distinct batches held on the device, cycled

    @property
    def patches(self) -> int:
        return (self.img // self.patch) ** 2


FULL = Size(img=224, patch=16, embed=768, depth=12, heads=12, dec_embed=512, dec_depth=8,
            dec_heads=16, masker_hidden=512, batch=256, cycle_batch=None, steps=20, warmup=3,
            n_batches=2)
DRY = Size(img=32, patch=8, embed=64, depth=2, heads=4, dec_embed=32, dec_depth=1, dec_heads=4,
           masker_hidden=32, batch=2, cycle_batch=2, steps=2, warmup=1, n_batches=2)
PRECISIONS = {"fp32": None, "bf16": torch.bfloat16}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# -- 3a. MAE throughput: engine against a hand-written loop ---------------------------------

def synthetic_batches(size: Size, device: torch.device, batch: int, classes: int = 1000):
    """``n_batches`` normalised ImageNet-shaped batches from synthetic_imagenet, on the device."""
    from mlomae.data import build_dataset
    ds = build_dataset("synthetic_imagenet", n=batch * size.n_batches, n_test=1,
                       num_classes=classes, image_size=size.img)
    mean = torch.tensor(ds.meta.mean, device=device).view(1, -1, 1, 1)
    std = torch.tensor(ds.meta.std, device=device).view(1, -1, 1, 1)
    out = []
    for i in range(size.n_batches):
        x, y = ds.gather(torch.arange(i * batch, (i + 1) * batch))
        x = (x.to(device).float().div_(255) - mean) / std
        out.append((x, y.to(device)))
    return out


def mae_model(size: Size, device: torch.device):
    from mlomae.models.mae import MaskedAutoencoder
    return MaskedAutoencoder(size.img, size.patch, 3, size.embed, size.depth, size.heads,
                             size.dec_embed, size.dec_depth, size.dec_heads).to(device)


def adamw(params):   # MAE's recipe (the lr does not change the time)
    return torch.optim.AdamW(params, lr=1.5e-4, betas=(0.9, 0.95), weight_decay=0.05)


class HandLoop:
    """MAE pretraining as one writes it by hand: random masks, loss, backward, AdamW."""

    def __init__(self, model, batches, size: Size, device: torch.device, dtype):
        self.model, self.opt = model, adamw(model.parameters())
        self.it, self.size, self.device, self.dtype = iter(Cycle(batches)), size, device, dtype
        self.steps = 0

    def __call__(self):
        from mlomae.models.masking import random_masking
        imgs, _ = next(self.it)
        masking = random_masking(imgs.shape[0], self.size.patches, 0.75, device=self.device)
        with torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype is not None):
            loss = self.model(imgs, masking)[0]
        loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        self.steps += 1


def throughput(size: Size, device: torch.device, precision: str) -> dict:
    from mlomae.engine import Engine
    from mlomae.models.attention import set_fused_attention
    from problems.pretrain import Reconstruction
    dtype = PRECISIONS[precision]
    batches = synthetic_batches(size, device, size.batch)
    torch.manual_seed(0)
    hand_model = mae_model(size, device)
    eng_model = copy.deepcopy(hand_model)
    for m in (hand_model, eng_model):
        set_fused_attention(m, True)   # first order: both keep the fused kernel
    hand = HandLoop(hand_model, batches, size, device, dtype)
    pre = Reconstruction("pretrain", eng_model, optimizer=adamw(eng_model.parameters()),
                         data=Cycle(batches), masking="random", mask_ratio=0.75)
    engine = Engine([pre], device=device, autocast_dtype=dtype)
    # one step of each from the same seed: the same update (information, GPU sums may differ)
    torch.manual_seed(123)
    hand()
    torch.manual_seed(123)
    engine.step()
    agree = common.rel(list(eng_model.parameters()), list(hand_model.parameters()))

    def timed(fn):
        def call():
            fn()
            sync(device)
        return call

    sync(device)
    times = common.interleave({"hand": timed(hand), "engine": timed(engine.step)}, size.steps,
                              warmup=size.warmup)
    med = {k: common.median(v) for k, v in times.items()}
    counted = {"hand": hand.steps - 1 - size.warmup, "engine": pre.step_count - 1 - size.warmup}
    out = {"precision": precision, "batch": size.batch, "requested_steps": size.steps,
           "counted_steps": counted,
           "images_per_s": {k: size.batch / v for k, v in med.items()},
           "median_step_s": med, "engine_over_hand": med["engine"] / med["hand"],
           "params_rel_diff_after_one_step": agree}
    del hand, engine, pre, hand_model, eng_model, batches
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return out


# -- 3b. the MLO-MAE cycle as the builder makes it -------------------------------------------

def cycle_overrides(size: Size, device: str, precision: str, steps: int) -> list[str]:
    o = [f"trainer.device={device}", f"trainer.precision={precision}", f"trainer.steps={steps}",
         "hypergrad.method=darts", "tracking.enabled=false", "evaluation=[]",
         "data.dataset=synthetic_imagenet", "data.num_workers=0", f"data.img_size={size.img}"]
    if size.cycle_batch is not None:
        o.append(f"data.batch_size={size.cycle_batch}")
    o.append("+data.options={n: %d, n_test: 8, image_size: %d}"
             % (max(64, 60 * (size.cycle_batch or 256)), size.img))
    if size is not FULL:
        o += [f"models.mae.img_size={size.img}", f"models.mae.patch_size={size.patch}",
              f"models.mae.embed_dim={size.embed}", f"models.mae.depth={size.depth}",
              f"models.mae.num_heads={size.heads}", f"models.mae.decoder_embed_dim={size.dec_embed}",
              f"models.mae.decoder_depth={size.dec_depth}",
              f"models.mae.decoder_num_heads={size.dec_heads}",
              f"models.masker.num_patches={size.patches}", f"models.masker.embed_dim={size.embed}",
              f"models.masker.hidden_dim={size.masker_hidden}",
              f"models.head.embed_dim={size.embed}"]
    return o


def mlomae_cycle(size: Size, device: str, precision: str) -> dict:
    from mlomae import config
    from mlomae.build import build
    from mlomae.check import PeakMemory
    total = size.warmup + size.steps
    cfg = config.load(EXPERIMENTS / "imagenet.yaml", cycle_overrides(size, device, precision, total))
    built = build(cfg)
    eng = built.engine
    batch = cfg["data"]["batch_size"]
    for p in eng.problems.values():   # batches made once, held on the device: no loader timed
        if p.data is not None:
            p.data, p._iter = Cycle([p.next_batch() for _ in range(size.n_batches)]), None
    out = {"precision": precision, "batch": batch, "method": "darts",
           "schedule": list(eng.schedule), "requested_steps": size.steps,
           "attention_fused": {n: sorted({m.fused_attn for m in p.module.modules()
                                          if isinstance(getattr(m, "fused_attn", None), bool)})
                               for n, p in eng.problems.items()}}
    try:
        for _ in range(size.warmup):
            eng.step()
        sync(built.device)
        start = {n: p.step_count for n, p in eng.problems.items()}
        outer0 = eng.outer_step
        times = []
        with PeakMemory(built.device) as mem:
            for _ in range(size.steps):
                t0 = time.perf_counter()
                eng.step()
                sync(built.device)
                times.append(time.perf_counter() - t0)
        out.update(counted_steps=eng.outer_step - outer0,
                   problem_steps={n: p.step_count - start[n] for n, p in eng.problems.items()},
                   expected_problem_steps={n: eng.schedule.count(n) * size.steps
                                           for n in eng.problems},
                   median_cycle_s=common.median(times), cycle_s=times,
                   images_per_s=batch * eng.schedule.count("pretrain") / common.median(times),
                   peak_growth_mb=mem.peak / 2**20)
        if built.device.type == "cuda":
            out["peak_allocated_mb"] = torch.cuda.max_memory_allocated(built.device) / 2**20
    except torch.cuda.OutOfMemoryError as e:
        out.update(error=f"out of memory: {str(e)[:300]}", counted_steps=None)
    del built, eng
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    return out


# -- 4. the table ---------------------------------------------------------------------------

def rows(res: dict) -> list[list]:
    t = res["cuda_tests"]
    out = [["CUDA tests", "pytest -m cuda",
            f"{t['passed']} passed, {t['skipped']} skipped, {t['failed']} failed",
            f"{t['tests']} tests", t["seconds"]]]
    for r in res["torchrun"]:
        ok = r["outer_steps"] == r["requested_steps"] and \
            r["problem_steps"] == r["expected_problem_steps"]
        out.append([f"torchrun {r['experiment']}", f"{r['nproc']} proc, {r['backend']}",
                    ("ok" if ok else "FAILED") + ("" if r["returncode"] == 0 else f" (rc {r['returncode']})"),
                    f"{r['outer_steps']}/{r['requested_steps']} outer steps", r["seconds"]])
    for r in res["throughput"]:
        out.append([f"MAE throughput {r['precision']}", f"batch {r['batch']}",
                    f"hand {r['images_per_s']['hand']:.1f} img/s, engine "
                    f"{r['images_per_s']['engine']:.1f} img/s ({r['engine_over_hand']:.3f}x time)",
                    f"{r['counted_steps']['engine']}/{r['requested_steps']} steps",
                    r["median_step_s"]["engine"]])
    for r in res["mlomae_cycle"]:
        if r.get("error"):
            out.append([f"MLO-MAE cycle {r['precision']}", f"darts, batch {r['batch']}",
                        r["error"][:60], "-", "-"])
            continue
        mem = r.get("peak_allocated_mb", r["peak_growth_mb"])
        out.append([f"MLO-MAE cycle {r['precision']}", f"darts, batch {r['batch']}",
                    f"{r['median_cycle_s']:.3f} s/cycle, peak {mem:.0f} MB"
                    + ("" if "peak_allocated_mb" in r else " (RSS growth)"),
                    f"{r['counted_steps']}/{r['requested_steps']} outer steps", r["median_cycle_s"]])
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dry-run", action="store_true",
                   help="the same code paths on the CPU at tiny sizes (automatic without CUDA)")
    p.add_argument("--out", default=None, help="JSON file (default benchmarks/results/"
                   "gpu_check.json; gpu_check-dry.json for a dry run)")
    p.add_argument("--steps", type=int, default=None, help="timed steps / outer steps "
                   f"(default {FULL.steps}; {DRY.steps} in a dry run)")
    p.add_argument("--nproc", type=int, default=1, help="torchrun processes (default 1)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads (default: torch's own; 1 in a dry run)")
    args = p.parse_args(argv)
    t_start = time.perf_counter()
    has_cuda = torch.cuda.is_available()
    dry = args.dry_run or not has_cuda
    why = ("--dry-run" if args.dry_run else "no CUDA device (torch.cuda.is_available() is "
           "False): dry run on the CPU at tiny sizes") if dry else None
    size = DRY if dry else FULL
    if args.steps:
        size = replace(size, steps=args.steps)
    threads = args.threads or (1 if dry else torch.get_num_threads())
    torch.set_num_threads(threads)
    device = "cpu" if dry else "cuda"
    dev = torch.device(device)
    print(common.describe_machine(threads))
    gpu = None
    if has_cuda:
        props = torch.cuda.get_device_properties(0)
        gpu = {"name": props.name, "memory_gib": round(props.total_memory / 2**30, 1),
               "capability": f"{props.major}.{props.minor}", "cuda": torch.version.cuda,
               "count": torch.cuda.device_count()}
        print(f"gpu: {gpu['name']}, {gpu['memory_gib']} GiB, capability {gpu['capability']}, "
              f"CUDA {gpu['cuda']}, {gpu['count']} device(s)")
    if dry:
        print(f"DRY RUN ({why}); numbers below time tiny models on the CPU and say nothing "
              f"about a GPU")
    print(f"device {device} (trainer.device), sizes {asdict(size)}", flush=True)

    res: dict = {"machine": common.machine(threads), "gpu": gpu, "dry_run": dry,
                 "dry_run_reason": why, "device": device, "sizes": asdict(size)}
    print("1/4 CUDA tests and 2/4 torchrun (side by side) ...", flush=True)
    tests = start_cuda_tests(dry)
    runs = [start_torchrun(e, device, size.steps, args.nproc, dry)
            for e in ("toy_bilevel", "quickstart")]
    res["cuda_tests"] = finish_cuda_tests(tests)
    res["torchrun"] = [finish_torchrun(r) for r in runs]
    print("3/4 MAE throughput, MLO-MAE cycle ...", flush=True)
    res["throughput"] = [throughput(size, dev, prec) for prec in PRECISIONS]
    res["mlomae_cycle"] = [mlomae_cycle(size, device, prec) for prec in PRECISIONS]
    table = rows(res)
    header = ["check", "setting", "result", "counted / requested", "seconds"]
    res["table"] = {"header": header, "rows": table}
    res["seconds"] = time.perf_counter() - t_start
    print("4/4 results")
    print(common.table(table, header))
    out = Path(args.out) if args.out else common.RESULTS / (
        "gpu_check-dry.json" if dry else "gpu_check.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=1, default=str) + "\n")
    print(f"wrote {out} ({res['seconds']:.1f} s)")
    miscounted = [r for r in res["torchrun"] if r["outer_steps"] != r["requested_steps"]
                  or r["problem_steps"] != r["expected_problem_steps"]]
    miscounted += [r for r in res["throughput"]
                   if set(r["counted_steps"].values()) != {r["requested_steps"]}]
    miscounted += [r for r in res["mlomae_cycle"] if r.get("error") is None and (
        r["counted_steps"] != r["requested_steps"]
        or r["problem_steps"] != r["expected_problem_steps"])]
    failed = res["cuda_tests"]["failed"] or any(r["returncode"] for r in res["torchrun"])
    if failed or miscounted:
        print(f"FAILED: {res['cuda_tests']['failed']} CUDA test(s), "
              f"{sum(1 for r in res['torchrun'] if r['returncode'])} torchrun run(s), "
              f"{len(miscounted)} check(s) whose counted steps differ from the requested ones")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
