"""From a validated config to a ready engine: data, models, optimizers, problems.

``build`` has no effect on disk (it is what ``mlomae validate`` runs).
"""

from __future__ import annotations

import hashlib
import platform
import random
import subprocess
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from . import __version__
from .components import check_kwargs, instantiate, locate
from .config import Config, flatten
from .schema import hypergrad_options
from .engine import Dependency, Engine, Problem
from .engine.graph import Graph
from .errors import ConfigError, DataError, MlomaeError, did_you_mean
from .models.attention import set_fused_attention
from .optim import build_optimizer, build_scheduler

DATA_KEYS = {"dataset", "root", "download", "options", "batch_size", "num_workers", "splits",
             "img_size", "channels", "augment", "disjoint", "eval_batch_size"}
PRECISION = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}   # fp16: with loss scaling


def resolve_precision(name: str, device: torch.device) -> tuple[str, str]:
    """(precision, why) for ``trainer.precision``. ``auto`` takes bf16 autocast only where the
    hardware runs it natively: a CUDA device with bf16, or a CPU with AMX or AVX-512 BF16 (as
    torch reports them); fp32 elsewhere. Measured: bf16 0.56-0.63x the fp32 time on a Xeon with
    AMX, 6.7x *slower* on an AMD EPYC with AVX2 only, where it is emulated."""
    if name != "auto":
        return name, "trainer.precision"
    if device.type == "cuda":
        if torch.cuda.is_bf16_supported():
            return "bf16", "auto: this GPU runs bf16"
        return "fp32", "auto: this GPU has no bf16"
    native = [label for label, probe in (("AMX", "_is_amx_tile_supported"),
                                         ("AVX-512 BF16", "_is_avx512_bf16_supported"))
              if getattr(torch.cpu, probe, lambda: False)()]
    if native:
        return "bf16", f"auto: this CPU runs bf16 natively ({', '.join(native)})"
    return "fp32", "auto: this CPU has neither AMX nor AVX-512 BF16, so bf16 would be emulated"


def select_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("CUDA is not available on this machine", key="trainer.device", value=name,
                          hint="use trainer.device=cpu or auto")
    return dev


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


RANK_STRIDE = 7919   # a prime stride between the seeds of ranks


def rank_seed(seed: int, rank: int, outer_step: int = 0) -> int:
    """The seed of process ``rank``'s own random stream (its masks and noise), from the
    experiment's ``seed``; ``outer_step`` gives a resumed process a stream of its own."""
    return seed + RANK_STRIDE * rank + outer_step


# -- data -----------------------------------------------------------------------------------

@dataclass
class DataBundle:
    """Base datasets, every role's indices, and loaders on demand."""

    cfg: Config
    meta: Any
    datasets: dict[str, Any]
    indices: dict[str, np.ndarray]
    specs: dict[str, Any]
    section: dict[str, Any]
    rank: int = 0
    world: int = 1
    sources: dict[str, str] = field(default_factory=dict)  # role -> base split

    def source(self, role: str) -> str:
        return self.sources[role]

    def transform(self, augment: bool):
        from .data import eval_transform, pretrain_transform
        if self.meta.task != "classification" or self.meta.channels is None:
            return None
        size = self.section.get("img_size") or self.meta.image_size[0]
        ch = self.section.get("channels")
        if augment and self.section.get("augment", True):
            return pretrain_transform(self.meta, size, channels=ch)
        return eval_transform(self.meta, size, channels=ch)

    def loader(self, role: str, batch_size: int | None = None, augment: bool = False,
               shuffle: bool = True, drop_last: bool = True, seed: int | None = None,
               device: torch.device | None = None):
        from .data import make_loader
        base = self.cfg["seed"] if seed is None else seed
        return make_loader(self.datasets[self.source(role)], self.indices[role],
                           batch_size or self.section.get("batch_size", 128), shuffle=shuffle,
                           seed=base + zlib.crc32(role.encode()) % 100_000, drop_last=drop_last,
                           num_workers=self.section.get("num_workers", 0),
                           transform=self.transform(augment), rank=self.rank,
                           world_size=self.world, device=device)


def build_data(cfg: Config, rank: int = 0, world: int = 1) -> DataBundle | None:
    section = cfg.get("data")
    if section is None:
        return None
    for k in section:
        if k not in DATA_KEYS:
            raise cfg.error("unknown key" + did_you_mean(k, DATA_KEYS), key=f"data.{k}",
                            hint="known keys: " + ", ".join(sorted(DATA_KEYS)))
    from .data import load_data
    splits = section.get("splits") or {"train": "train"}
    try:
        bundle = load_data(section["dataset"], splits, cfg["seed"], root=section.get("root"),
                           download=bool(section.get("download", False)),
                           disjoint=section.get("disjoint", ["finetune", "mask"]),
                           **(section.get("options") or {}))
    except ConfigError as e:
        raise e.located(file=cfg.file) from None
    except DataError as e:
        raise DataError(f"{cfg.file}: {e}") from None
    return DataBundle(cfg, bundle.meta, bundle.datasets, bundle.indices, dict(splits),
                      dict(section), rank, world, dict(bundle.sources))


# -- building -------------------------------------------------------------------------------

@dataclass
class Built:
    cfg: Config
    device: torch.device
    models: dict[str, nn.Module]
    problems: dict[str, Problem]
    engine: Engine
    data: DataBundle | None
    context: dict[str, Any] = field(default_factory=dict)
    precision: tuple[str, str] = ("fp32", "")   # (chosen, why): resolve_precision


def build_models(cfg: Config, device: torch.device) -> dict[str, nn.Module]:
    models = {}
    for name, spec in cfg["models"].items():
        m = instantiate(spec, cfg, f"models.{name}")
        if not isinstance(m, nn.Module):
            raise cfg.error("target is not a torch.nn.Module", key=f"models.{name}.target",
                            value=spec["target"])
        models[name] = m.to(device)
    return models


def build(cfg: Config, *, rank: int = 0, world: int = 1, callbacks=()) -> Built:
    """Everything short of training: data, models, optimizers, problems, the engine."""
    device = setup_process(cfg, rank)
    check_evaluation(cfg)
    data = build_data(cfg, rank, world)
    seed_everything(cfg["seed"])  # model initialisation identical on every rank
    models = build_models(cfg, device)
    if rank:  # then each process draws its own masks and noise
        seed_everything(rank_seed(cfg["seed"], rank))
    problems = build_problems(cfg, models, data, device)
    precision = resolve_precision(cfg["trainer"]["precision"], device)
    engine = build_engine(cfg, problems, device, world, callbacks, precision[0])
    if engine.scaling:
        ls = engine.loss_scale
        precision = (precision[0], f"{precision[1]}; dynamic loss scale from {ls.init:g}, "
                                   f"x{ls.growth:g} every {ls.growth_interval} clean steps")
    choose_attention(cfg, engine)
    return Built(cfg, device, models, problems, engine, data, precision=precision)


def setup_process(cfg: Config, rank: int = 0) -> torch.device:
    """Threads, device, this process's seed and determinism, from ``trainer``."""
    tr = cfg["trainer"]
    if tr["threads"]:
        torch.set_num_threads(tr["threads"])
    device = select_device(tr["device"])
    seed_everything(cfg["seed"] + rank)
    if tr["deterministic"]:
        torch.use_deterministic_algorithms(True, warn_only=True)
    return device


def build_problems(cfg: Config, models: dict[str, nn.Module], data: DataBundle | None,
                   device: torch.device) -> dict[str, Problem]:
    """Each problem with its module, optimizer, schedule (over the run's steps) and loader."""
    cycle = build_graph(cfg).cycle()   # how many steps each problem takes over the run
    problems: dict[str, Problem] = {}
    for name, spec in cfg["problems"].items():
        key = f"problems.{name}"
        cls = problem_class(cfg, name)
        module = models[spec["module"]] if spec["module"] else nn.Module()
        opt = build_optimizer(module, spec["optimizer"], cfg, f"{key}.optimizer") if spec["optimizer"] else None
        total = cycle.count(name) * cfg["trainer"]["steps"]
        sched = build_scheduler(opt, spec["scheduler"], total, cfg, f"{key}.scheduler")
        loader = None
        if spec["data"] is not None:
            if data is None:
                raise cfg.error("names a split but the experiment has no data section",
                                key=f"{key}.data", value=spec["data"])
            loader = data.loader(spec["data"], spec["batch_size"], augment=cls.augment, device=device)
        common = dict(name=name, module=module, optimizer=opt, scheduler=sched, data=loader,
                      steps=spec["steps"], grad_clip=spec["grad_clip"], reads=spec["reads"])
        args = dict(spec["args"])
        check_kwargs(cls, {**args, **common}, cfg, key)
        try:
            problems[name] = cls(**common, **args)
        except (ValueError, TypeError) as e:
            raise cfg.error(f"building the problem failed: {e}", key=key) from None
        problems[name].total_steps = total
    return problems


def problem_class(cfg: Config, name: str) -> type[Problem]:
    key = f"problems.{name}"
    target = cfg["problems"][name]["target"]
    cls = locate(target, cfg, f"{key}.target")
    if not (isinstance(cls, type) and issubclass(cls, Problem)):
        raise cfg.error("target is not a subclass of mlomae.engine.Problem",
                        key=f"{key}.target", value=target)
    return cls


def build_engine(cfg: Config, problems: dict[str, Problem], device: torch.device, world: int = 1,
                 callbacks=(), precision: str | None = None) -> Engine:
    tr = cfg["trainer"]
    precision = precision or resolve_precision(tr["precision"], device)[0]
    method, flat, per = hypergrad_options(cfg["hypergrad"])
    try:
        return Engine(list(problems.values()), dependencies(cfg), method=method, options=flat,
                      method_options=per, device=device, reducer=_reducer(world),
                      on_nonfinite=tr["on_nonfinite"], autocast_dtype=PRECISION[precision],
                      loss_scale=tr.get("loss_scale"), callbacks=list(callbacks))
    except MlomaeError as e:
        raise ConfigError(str(e), file=cfg.file, key="dependencies") from None


def choose_attention(cfg: Config | None, engine: Engine) -> dict[str, bool]:
    """Switch timm's fused attention in each problem's module; returns name -> fused.

    A problem's ``fused_attention`` (``auto``, the default, or true / false): ``auto`` keeps the
    fused kernel unless a second-order push differentiates the module twice
    (``Graph.differentiated_twice``: unroll, neumann, cg or exact darts through the problem, or
    through a lower problem that reads it and is not a head on top of it), since the CPU kernel
    of fused attention has no double backward. Measured on 2 CPU cores (Fashion-MNIST MAE: embed
    128, depth 4, batch 128; medians of 20 interleaved runs): a masked pretraining step 104 ms
    fused vs 108 ms plain, an unmasked 50-token forward + backward 201 vs 217 ms; plain attention
    costs 4-8% here, and more on a GPU at 197 tokens, so it is used only when needed. Under bf16
    autocast on a CPU ``auto`` takes plain attention everywhere: the CPU's fused kernel is the
    slow one there (30 outer steps of mae_random.yaml on a Xeon with AMX: 13.1 s plain against
    24.9 s fused, 16.6 s in float32 fused, 2026-12-01). Call it with ``cfg=None`` for problems
    built by hand (every setting ``auto``).
    """
    twice = engine.graph.differentiated_twice()
    slow_fused = engine.device.type == "cpu" and engine.autocast_dtype is torch.bfloat16
    chosen = {}
    for name, p in engine.problems.items():
        setting = "auto" if cfg is None else cfg["problems"][name]["fused_attention"]
        chosen[name] = (name not in twice and not slow_fused) if setting == "auto" else bool(setting)
        set_fused_attention(p.module, chosen[name])
    return chosen


def _reducer(world: int):
    from .distributed import reducer
    return reducer(world)


def check_evaluation(cfg: Config) -> None:
    """Evaluations are checked before training starts, so a typo costs seconds, not a run."""
    from .eval import check_evaluation as check
    check(cfg)


# trainer keys that leave the trajectory as it is: a run may be resumed with other values
OUTSIDE_DIGEST = ("steps", "check_hypergrad_every", "check_hypergrad_methods")


def config_digest(cfg: Config) -> str:
    """Identifies an experiment for --resume: the resolved config less the step budget and the
    other trainer keys that do not change what is trained (``OUTSIDE_DIGEST``)."""
    d = dict(cfg.data)
    d["trainer"] = {k: v for k, v in d["trainer"].items() if k not in OUTSIDE_DIGEST}
    d.pop("tracking", None)
    return hashlib.sha256(repr(sorted(flatten(d).items())).encode()).hexdigest()[:16]


def versions() -> dict[str, str]:
    import timm
    return {"mlomae": __version__, "torch": torch.__version__, "timm": timm.__version__,
            "python": platform.python_version(), "numpy": np.__version__}


def source_commit() -> str | None:
    """The git commit of the checkout this package runs from, its first 12 digits, with
    ``+dirty`` when tracked files differ from it; None outside a git checkout (an installed
    wheel) or without git."""
    root = Path(__file__).resolve().parent.parent
    if not (root / ".git").exists():
        return None
    git = ["git", "-C", str(root)]
    try:
        head = subprocess.run([*git, "rev-parse", "HEAD"], capture_output=True, text=True, timeout=20)
        if head.returncode != 0:
            return None
        dirty = subprocess.run([*git, "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return None
    return head.stdout.strip()[:12] + ("+dirty" if dirty.stdout.strip() else "")


def dependencies(cfg: Config) -> list[Dependency]:
    out = []
    for d in cfg["dependencies"]:
        hg = d["hypergrad"] or {}
        method = hg.get("method")
        opts = {k: v for k, v in hg.items() if k != "method" and not isinstance(v, dict)}
        per = {k: dict(v) for k, v in hg.items() if k != "method" and isinstance(v, dict)}
        out.append(Dependency(d["upper"], d["lower"], method, opts, per))
    return out


def build_graph(cfg: Config) -> Graph:
    """The problem graph alone (no models, no data): for ``mlomae graph``."""
    method, flat, per = hypergrad_options(cfg["hypergrad"])
    names = list(cfg["problems"])
    once = [n for n in names if getattr(_target(cfg, n), "first_order_reads", False)]
    try:
        return Graph({n: cfg["problems"][n]["steps"] for n in names},
                     {n: cfg["problems"][n]["reads"] for n in names}, dependencies(cfg), method, flat,
                     method_options=per, reads_once=once)
    except MlomaeError as e:
        raise ConfigError(str(e), file=cfg.file, key="dependencies") from None


def _target(cfg: Config, name: str) -> Any:
    """A problem's class if it can be imported (for what the graph asks of it), else None:
    ``mlomae graph`` must not fail on a target that ``validate`` reports."""
    try:
        return locate(cfg["problems"][name]["target"], cfg, f"problems.{name}.target")
    except MlomaeError:
        return None
