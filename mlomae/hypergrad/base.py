"""What every hypergradient method shares: the ``Method`` object, the ``LowerLevel`` view it
works on, and the small tensor helpers methods compose.

Notation (DESIGN.md): lower parameters θ, lower loss f(θ, x) where x are the tensors the lower
loss reads that are themselves functions of the upper parameters λ (λ itself, or the parameters
of problems between), and an adjoint ``v = dF/dθ`` handed down from above. A method returns, for
each input x, its contribution to ``dF/dx``:

    implicit:  -(∂²f/∂x∂θ) H⁻¹ v      with H = ∂²f/∂θ²
    unroll:    (∂θ_K/∂x)ᵀ v            through the recorded differentiable lower steps

The engine chains these contributions along every path of a deeper graph; a method only ever
sees one lower problem.

A method is a frozen dataclass: its options are its fields (default, type and range in one
place, checked on construction), and it declares what it needs the lower problem's steps to keep
(``keeps``) and whether it differentiates the lower loss twice (``second_order``). The engine
and the graph ask these, never the method's name. Adding a method is one file with a
``@register``-ed subclass and its name in the import line of ``__init__.py``.
"""

from __future__ import annotations

import enum
import typing
from dataclasses import dataclass, field, fields
from typing import Any, Callable, ClassVar, Mapping, Sequence

import torch
from torch import Tensor

from ..errors import did_you_mean


class Keep(enum.Enum):
    """What a lower problem's steps must keep for a push through it."""

    NOTHING = "nothing"                 # the method evaluates the lower loss itself
    UNROLLED = "unrolled steps"         # the steps since the last push, run differentiably
    STEP_GRAPH = "last step's graph"    # ∇_θ f of the last step with its graph kept
    STEP_GRADIENT = "last step's gradient"  # the gradient the lower's optimizer last applied


class OptionError(ValueError):
    """A method option that is unknown or out of range; names the method and the option."""

    def __init__(self, method: str, option: str | None, message: str, value: Any = ...):
        self.method, self.option, self.value, self.detail = method, option, value, message
        where = f"{method}: option '{option}': " if option else ""
        got = "" if value is ... else f" (got {value!r})"
        super().__init__(f"{where}{message}{got}")


def option(default: Any, doc: str, *, minimum: float | None = None, above: float | None = None) -> Any:
    """A method option: a dataclass field with its help text and range (``minimum`` ≤ value,
    ``above`` < value)."""
    return field(default=default, metadata={"doc": doc, "minimum": minimum, "above": above})


METHODS: dict[str, type["Method"]] = {}


def register(cls: type["Method"]) -> type["Method"]:
    """Class decorator: make ``cls`` known by ``cls.name`` (in import order)."""
    if cls.name in METHODS and METHODS[cls.name] is not cls:
        raise ValueError(f"two hypergradient methods are named '{cls.name}'")
    METHODS[cls.name] = cls
    return cls


@dataclass(frozen=True)
class Method:
    """A hypergradient method with its options. Subclasses set ``name`` and ``summary``,
    declare options with :func:`option`, and implement ``__call__``."""

    name: ClassVar[str] = ""
    summary: ClassVar[str] = ""
    reference: ClassVar[bool] = False   # the exact value the others are checked against
    passes: ClassVar[bool] = True       # False: contributes nothing, so no path goes through it

    # -- what the engine asks ------------------------------------------------------------------
    @property
    def keeps(self) -> Keep:
        """What the lower problem's steps must keep for this method's push."""
        return Keep.NOTHING

    @property
    def applied_gradient(self) -> bool:
        """Whether the push reads the gradient the lower's optimizer last applied
        (``LowerLevel.step_gradient``; SAMA's preconditioner), whatever else the steps keep."""
        return self.keeps is Keep.STEP_GRADIENT

    @property
    def second_order(self) -> bool:
        """Whether the push differentiates the lower loss twice (Hessian-vector or mixed
        products by double backward): then the lower's module needs kernels that have a double
        backward (plain attention, not the fused CPU kernel)."""
        return False

    @property
    def precise_loss(self) -> bool:
        """Whether the lower loss this push re-evaluates must be computed in full precision (no
        autocast): a finite difference divides the difference of two gradients by 2ε, and an
        approximate H⁻¹ amplifies errors in the Hessian products, so bf16 rounding would
        dominate (tests/test_precision.py)."""
        return False

    def unsupported(self, optimizer: torch.optim.Optimizer | None) -> str | None:
        """Why this method cannot push through a lower problem with ``optimizer`` (or None)."""
        return None

    def __call__(self, v: Sequence[Tensor], lower: "LowerLevel",
                 inputs: Sequence[Tensor]) -> list[Tensor | None]:
        raise NotImplementedError(f"{type(self).__name__}.__call__")

    # -- options -------------------------------------------------------------------------------
    @classmethod
    def options(cls) -> dict[str, tuple[Any, str]]:
        """Option name -> (default, help text)."""
        return {f.name: (f.default, f.metadata.get("doc", "")) for f in fields(cls)}

    def values(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    def __str__(self) -> str:
        shown = ", ".join(f"{k}={v}" for k, v in self.values().items() if v is not None)
        return f"{self.name} {shown}" if shown else self.name

    def __post_init__(self) -> None:
        hints = typing.get_type_hints(type(self))
        for f in fields(self):
            value = getattr(self, f.name)
            checked = _check_value(self.name, f.name, value, hints[f.name], f.metadata)
            if checked is not value:
                object.__setattr__(self, f.name, checked)


class ImplicitMethod(Method):
    """An implicit method: -(∂²f/∂x∂θ) w with w ≈ H⁻¹v from :meth:`solve`, by Hessian-vector
    products on one graph of ∇_θ f at the current θ (evaluated in full precision: an approximate
    H⁻¹ amplifies rounding in the products). Subclasses implement ``solve``."""

    @property
    def second_order(self) -> bool:
        return True

    @property
    def precise_loss(self) -> bool:
        return True   # H⁻¹ amplifies bf16 rounding of the Hessian products (cosine 0.88 for cg)

    def solve(self, hvp: Callable[[list[Tensor]], list[Tensor]], v: list[Tensor],
              lower: "LowerLevel") -> list[Tensor]:
        raise NotImplementedError(f"{type(self).__name__}.solve")

    def __call__(self, v: Sequence[Tensor], lower: "LowerLevel",
                 inputs: Sequence[Tensor]) -> list[Tensor | None]:
        grads = inner_grad(lower)
        w = self.solve(hvp_fn(grads, lower.params, lower.reduce), [t.detach() for t in v], lower)
        return mixed_vjp(grads, inputs, w, lower.reduce)


def _check_value(method: str, name: str, value: Any, hint: Any, meta: Mapping[str, Any]) -> Any:
    allowed = set(typing.get_args(hint)) if typing.get_origin(hint) in (typing.Union, _UnionType) else {hint}
    if value is None:
        if type(None) in allowed:
            return value
        raise OptionError(method, name, "must not be null", value)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        if bool in allowed and isinstance(value, bool):
            return value
        raise OptionError(method, name, f"must be {_kind(allowed)}", value)
    if bool in allowed and int not in allowed and float not in allowed:
        raise OptionError(method, name, "must be true or false", value)
    if int in allowed and float not in allowed and not isinstance(value, int):
        raise OptionError(method, name, "must be an integer", value)
    lo, above = meta.get("minimum"), meta.get("above")
    if lo is not None and value < lo:
        what = ("a positive integer" if lo == 1 else f"an integer >= {lo}") if int in allowed \
            else f"a number >= {lo}"
        raise OptionError(method, name, f"must be {what}", value)
    if above is not None and not value > above:
        what = "a positive number" if above == 0 else f"a number > {above}"
        raise OptionError(method, name, f"must be {what}", value)
    return float(value) if float in allowed and int not in allowed else value


_UnionType = type(int | None)


def _kind(allowed: set) -> str:
    names = [{int: "an integer", float: "a number", bool: "true or false"}.get(t, "null")
             for t in (int, float, bool, type(None)) if t in allowed]
    return " or ".join(names)


def make(method: "str | Method", options: Mapping[str, Any] | None = None) -> "Method":
    """The method named ``method`` with ``options``; a ``Method`` is returned as it is (then
    ``options`` must be empty). Unknown names and options raise ``OptionError`` with a
    did-you-mean."""
    if isinstance(method, Method):
        if options:
            raise OptionError(method.name, None, f"{method.name}: options are given twice: in "
                              f"the method object and as {dict(options)!r}")
        return method
    cls = METHODS.get(method)
    if cls is None:
        raise OptionError(str(method), None, f"unknown hypergradient method '{method}'"
                          + did_you_mean(method, METHODS) + "; known: " + ", ".join(METHODS))
    opts = dict(options or {})
    known = {f.name for f in fields(cls)}
    for k in opts:
        if k not in known:
            raise OptionError(cls.name, k, f"not an option of '{cls.name}'" + did_you_mean(k, known)
                              + ("; options: " + ", ".join(sorted(known)) if known
                                 else f"; '{cls.name}' takes no options"), opts[k])
    return cls(**opts)


@dataclass
class UnrollTrace:
    """The differentiable record of a lower problem's last steps.

    ``outputs`` are θ_K as tensors of a live autograd graph; ``sources[i]`` lists the graph
    tensors that stood for input ``i`` during those steps (the input itself, or snapshots of it
    taken when the input changed between steps).
    """

    outputs: list[Tensor]
    sources: list[list[Tensor]] = field(default_factory=list)
    steps: int = 0


@dataclass
class LowerLevel:
    """What a method may know about the lower problem, all as tensors and closures.

    ``loss`` evaluates f at the current θ on the lower problem's last batch, replaying the same
    randomness (masks, dropout) as the step that used that batch, so finite differences and
    Hessian-vector products see one function.

    ``reduce`` averages a list of derivatives of ``loss`` over data-parallel processes (the
    identity in one process); a method applies it to every such derivative it computes, so
    that its result is the one the whole batch would give.

    What the lower's steps kept, by the method's ``keeps``: ``trace`` (``Keep.UNROLLED``);
    ``step_grads`` (``Keep.STEP_GRAPH``), the last step's ∇_θ f on this process's batch with its
    graph kept, at the parameters the step started from (the inputs then are the copies the
    step read); ``step_gradient`` (``Keep.STEP_GRADIENT``), the gradient the optimizer last
    applied (averaged over processes, clipped), detached. Each is None when the engine has no
    such record (the upper stepped before the lower in the schedule). ``retain_step`` says
    another push reads the same record after this one, so its graph must survive this push's
    backward. ``optimizer`` is the lower problem's (for its state and hyper-parameters; None if
    it has none); a method only reads it.
    """

    params: list[Tensor]
    loss: Callable[[], Tensor]
    lr: float = 1.0
    trace: UnrollTrace | None = None
    reduce: Callable[[list], list] = field(default=lambda ts: ts)
    step_grads: list[Tensor] | None = None
    retain_step: bool = False
    step_gradient: list[Tensor] | None = None
    optimizer: torch.optim.Optimizer | None = None


def dot(a: Sequence[Tensor], b: Sequence[Tensor]) -> Tensor:
    return sum((x * y).sum() for x, y in zip(a, b))


def norm(a: Sequence[Tensor]) -> Tensor:
    norms = torch._foreach_norm([x.detach() for x in a])   # one call, not two ops per tensor
    return torch.linalg.vector_norm(torch.stack([n.float() for n in norms]))


def inner_grad(lower: LowerLevel) -> list[Tensor]:
    """∇_θ f with its graph kept, for Hessian-vector and mixed products."""
    loss = lower.loss()
    grads = torch.autograd.grad(loss, lower.params, create_graph=True, allow_unused=True)
    return [g if g is not None else torch.zeros_like(p) for g, p in zip(grads, lower.params)]


def hvp_fn(grads: Sequence[Tensor], params: Sequence[Tensor],
           reduce: Callable[[list], list] = lambda ts: ts) -> Callable[[list[Tensor]], list[Tensor]]:
    """w ↦ H w, reusing one graph of ∇_θ f."""

    def hvp(w: list[Tensor]) -> list[Tensor]:
        out = torch.autograd.grad(grads, params, grad_outputs=w, retain_graph=True,
                                  allow_unused=True)
        return reduce([o if o is not None else torch.zeros_like(p) for o, p in zip(out, params)])

    return hvp


def mixed_vjp(grads: Sequence[Tensor], inputs: Sequence[Tensor], w: Sequence[Tensor],
              reduce: Callable[[list], list] = lambda ts: ts,
              retain_graph: bool = False) -> list[Tensor | None]:
    """-(∂²f/∂x∂θ) w for each input x (None where f does not depend on x)."""
    out = torch.autograd.grad(grads, list(inputs), grad_outputs=list(w), allow_unused=True,
                              retain_graph=retain_graph)
    return reduce([None if o is None else -o for o in out])
