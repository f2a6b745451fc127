"""The problem graph: dependencies, validation, the schedule, and the hypergradient paths.

A dependency ``(upper U, lower L)`` says that L is solved (K_L steps) for each step of U, and
that U's gradient may flow through L's solution. What a loss *reads* decides which of those
paths carry anything: an upper problem U's adjoint enters a lower problem P when U's loss reads
P, and leaves P into every problem P's loss reads that is U or lies below U. Paths that never
return to U carry nothing and are never computed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

from ..errors import GraphError, did_you_mean
from ..hypergrad import DEFAULT, Keep, Method, OptionError, make
from .order import find_cycle, push_order


@dataclass(frozen=True)
class Dependency:
    upper: str
    lower: str
    method: "str | Method | None" = None  # None: the graph's default
    options: Mapping[str, Any] = field(default_factory=dict)
    # options for whichever method the edge ends up with, e.g. {"darts": {"exact": True}}:
    # they stay in force when a sweep swaps the default method, and apply only to that method
    method_options: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)


@dataclass
class Plan:
    """How the gradient of one upper problem is assembled."""

    upper: str
    enters: list[str]                  # lower problems U's loss reads whose adjoint is needed
    order: list[str]                   # lower problems in push order (a problem before those it reads)
    inputs: dict[str, list[str]]       # P -> problems its push reaches (U or useful lowers)
    methods: dict[str, Method]         # P -> the method of the push through P


class Graph:
    """``default_method`` is a method name (its options in ``default_options``) or a ``Method``;
    ``method_options`` holds options per method name, used wherever that method is picked;
    ``reads_once`` names the problems whose loss differentiates the modules it reads only once
    whatever method pushes through it (a head on an encoder), for :meth:`differentiated_twice`."""

    def __init__(self, steps: Mapping[str, int], reads: Mapping[str, Sequence[str]],
                 dependencies: Sequence[Dependency], default_method: "str | Method" = DEFAULT,
                 default_options: Mapping[str, Any] | None = None,
                 method_options: Mapping[str, Mapping[str, Any]] | None = None,
                 reads_once: Sequence[str] = ()):
        self.names = list(steps)
        self.steps = dict(steps)
        self.reads = {n: list(reads.get(n, ())) for n in self.names}
        self.dependencies = list(dependencies)
        self.default_method = default_method
        self.default_options = dict(default_options or {})
        # options for each method when a dependency picks it without giving its own
        self.method_options = {m: dict(o) for m, o in (method_options or {}).items()}
        self.reads_once = set(reads_once)
        self._validate()
        self.lowers = {n: [d.lower for d in self.dependencies if d.upper == n] for n in self.names}
        self.uppers = {n: [d.upper for d in self.dependencies if d.lower == n] for n in self.names}
        self.topo = self._topological()  # lowest first
        # every edge's method is built here, so a bad name or option fails before anything runs
        self._method(self.default_method, self.default_options, "the default method")
        for d in self.dependencies:
            self.method_for(d.upper, d.lower)
        self.plans = {n: p for n in self.names if (p := self._plan(n)) is not None}
        self.keeps = {n: self._keeps(n) for n in self.names}
        # problems whose steps also keep the gradient their optimizer applied, detached
        self.applied = {lower for plan in self.plans.values()
                        for lower, m in plan.methods.items() if m.applied_gradient}

    # -- validation -------------------------------------------------------------------------
    def _validate(self) -> None:
        if not self.names:
            raise GraphError("no problems declared")
        known = set(self.names)
        for n, k in self.steps.items():
            if int(k) < 1:
                raise GraphError(f"problem '{n}': steps must be a positive integer (got {k})")
        for n, rs in self.reads.items():
            for r in rs:
                if r not in known:
                    raise GraphError(f"problem '{n}' reads unknown problem '{r}'"
                                     f"{did_you_mean(r, known)}")
                if r == n:
                    raise GraphError(f"problem '{n}' lists itself in reads")
        seen = set()
        for d in self.dependencies:
            for role in ("upper", "lower"):
                name = getattr(d, role)
                if name not in known:
                    raise GraphError(f"dependency {d.upper} -> {d.lower}: {role} '{name}' is not a "
                                     f"declared problem{did_you_mean(name, known)}")
            if d.upper == d.lower:
                raise GraphError(f"dependency {d.upper} -> {d.lower}: a problem cannot depend on itself")
            if (d.upper, d.lower) in seen:
                raise GraphError(f"dependency {d.upper} -> {d.lower} is declared twice")
            seen.add((d.upper, d.lower))
        if len(self.names) > 1:
            linked = {d.upper for d in self.dependencies} | {d.lower for d in self.dependencies}
            for n in self.names:
                if n not in linked:
                    raise GraphError(f"problem '{n}' is in no dependency, so the schedule never "
                                     "relates it to the others: add a dependency or remove it")
        cycle = find_cycle(self.names, [(d.upper, d.lower) for d in self.dependencies])
        if cycle:
            raise GraphError("dependencies form a cycle: " + " -> ".join(cycle))

    def _topological(self) -> list[str]:
        order, done = [], set()

        def visit(n: str) -> None:
            if n in done:
                return
            done.add(n)
            for low in self.lowers[n]:
                visit(low)
            order.append(n)

        for n in self.names:
            visit(n)
        return order

    # -- hypergradient plans ----------------------------------------------------------------
    def scope(self, upper: str) -> list[str]:
        """Every problem below ``upper`` (transitively), lowest first."""
        below, stack = set(), list(self.lowers[upper])
        while stack:
            n = stack.pop()
            if n not in below:
                below.add(n)
                stack.extend(self.lowers[n])
        return [n for n in self.topo if n in below]

    def method_for(self, upper: str, lower: str) -> Method:
        """The edge (upper, lower)'s method if declared, else the first edge into ``lower``
        from within ``upper``'s scope, else the default; with its options merged: the
        method's block (``method_options``), the default's options if it is the default
        method, the edge's block for it, the edge's own options."""
        scope = set(self.scope(upper)) | {upper}
        direct = [d for d in self.dependencies if d.upper == upper and d.lower == lower]
        inner = [d for d in self.dependencies if d.lower == lower and d.upper in scope]
        default_name, default_opts = _name_and_options(self.default_method, self.default_options)
        for d in direct + inner:
            if d.method is not None or d.options or d.method_options:
                if d.method is None:
                    name, own = default_name, dict(d.options)
                else:
                    name, own = _name_and_options(d.method, d.options)
                opts = dict(self.method_options.get(name, {}))
                if name == default_name:
                    opts.update(default_opts)
                opts.update(d.method_options.get(name, {}))
                opts.update(own)
                return self._method(name, opts, f"dependency {d.upper} -> {d.lower}")
        opts = dict(self.method_options.get(default_name, {}))
        opts.update(default_opts)
        return self._method(default_name, opts, "the default method")

    @staticmethod
    def _method(method: "str | Method", options: Mapping[str, Any], where: str) -> Method:
        if isinstance(method, Method):
            method, options = _name_and_options(method, options)
        try:
            return make(method, options)
        except OptionError as e:
            raise GraphError(f"{where}: {e}") from None

    def _plan(self, upper: str) -> Plan | None:
        scope = self.scope(upper)
        if not scope:
            return None
        in_scope = set(scope)
        # useful: a lower problem from which a push can reach `upper` through reads
        useful: set[str] = set()
        changed = True
        while changed:
            changed = False
            for p in scope:
                if p not in useful and any(r == upper or r in useful for r in self.reads[p]):
                    useful.add(p)
                    changed = True
        methods = {p: self.method_for(upper, p) for p in useful}
        live = {p for p in useful if methods[p].passes}
        # a first-order problem still passes nothing: drop it and what only it reached
        changed = True
        while changed:
            changed = False
            for p in list(live):
                if not any(r == upper or r in live for r in self.reads[p]):
                    live.discard(p)
                    changed = True
        if not live:
            return None
        inputs = {p: [r for r in self.reads[p] if r == upper or r in live] for p in live}
        order = push_order(sorted(live, key=scope.index), inputs)
        if order is None:
            raise GraphError(f"below '{upper}', problems read each other in a loop "
                             f"({', '.join(sorted(live))}); the hypergradient is undefined")
        enters = [r for r in self.reads[upper] if r in live and r in in_scope]
        if not enters:
            return None
        return Plan(upper=upper, enters=enters, order=order, inputs=inputs,
                    methods={p: methods[p] for p in live})

    # -- what lower steps keep ---------------------------------------------------------------
    def _keeps(self, lower: str) -> Keep:
        """What ``lower``'s steps keep for the pushes through it: unrolled steps if any push
        unrolls it; else the last step's gradient graph if a push reads that and ``lower`` has
        no hypergradient of its own to assemble (a push that finds none takes its method at the
        current parameters); else the last applied gradient if a push reads that."""
        wanted = {plan.methods[lower].keeps for plan in self.plans.values() if lower in plan.methods}
        if Keep.UNROLLED in wanted:
            return Keep.UNROLLED
        if Keep.STEP_GRAPH in wanted and lower not in self.plans:
            return Keep.STEP_GRAPH
        if Keep.STEP_GRADIENT in wanted:
            return Keep.STEP_GRADIENT
        return Keep.NOTHING

    def kept_by(self, keep: Keep) -> set[str]:
        """The problems whose steps keep ``keep``."""
        return {n for n, k in self.keeps.items() if k is keep}

    def unrolled(self) -> set[str]:
        """Problems whose steps must be recorded differentiably."""
        return self.kept_by(Keep.UNROLLED)

    def recorded(self) -> set[str]:
        """Problems whose last step keeps its gradient's graph (at the parameters that step
        started from) for a push that reads it (exact DARTS)."""
        return self.kept_by(Keep.STEP_GRAPH)

    def step_readers(self, schedule: list[str]) -> dict[str, list[int]]:
        """For each problem whose steps keep a graph (unrolled steps, the last step's
        gradient graph), per step of it in ``schedule``: how many pushes read what that step
        kept before the problem steps again or the cycle ends. The last of them frees it."""
        out: dict[str, list[int]] = {}
        for lower, keep in self.keeps.items():
            if keep not in (Keep.UNROLLED, Keep.STEP_GRAPH):
                continue
            readers = {u for u, plan in self.plans.items()
                       if lower in plan.methods and plan.methods[lower].keeps is keep}
            uses: list[int] = []
            for name in schedule:
                if name == lower:
                    uses.append(0)
                elif uses and name in readers:
                    uses[-1] += 1
            out[lower] = uses
        return out

    def differentiated_twice(self) -> set[str]:
        """Problems whose module some push differentiates twice (a second-order method through
        it): the lower problem of such a push, and the problems that lower reads unless it reads
        them once (``reads_once``). Those modules need kernels with a double backward."""
        out: set[str] = set()
        for plan in self.plans.values():
            for lower, method in plan.methods.items():
                if method.second_order:
                    out.add(lower)
                    if lower not in self.reads_once:
                        out.update(self.reads[lower])
        return out

    def paths(self, upper: str) -> list[list[str]]:
        """Every path an adjoint takes from ``upper`` back to it, as problem names."""
        plan = self.plans.get(upper)
        if plan is None:
            return []
        out: list[list[str]] = []

        def walk(path: list[str]) -> None:
            for r in plan.inputs[path[-1]]:
                if r == upper:
                    out.append(path + [upper])
                elif r not in path:
                    walk(path + [r])

        for e in plan.enters:
            walk([upper, e])
        return out

    # -- schedule -------------------------------------------------------------------------
    def cycle(self, limit: int = 100_000) -> list[str]:
        """One period of the schedule: a lower problem runs its K steps, then its uppers step
        (each upper steps once all its lowers have taken K steps since its own last step).
        Leaves tick in declaration order; ready problems follow, lowest first."""
        count = {(d.lower, d.upper): 0 for d in self.dependencies}
        leaves = [n for n in self.names if not self.lowers[n]]
        seq: list[str] = []

        def stepped(n: str) -> None:
            seq.append(n)
            for u in self.uppers[n]:
                count[(n, u)] += 1
            for low in self.lowers[n]:
                count[(low, n)] = 0

        while True:
            for leaf in leaves:
                stepped(leaf)
            progress = True
            while progress:
                progress = False
                for n in self.topo:
                    if self.lowers[n] and all(count[(low, n)] >= self.steps[low] for low in self.lowers[n]):
                        stepped(n)
                        progress = True
            if all(v == 0 for v in count.values()):
                return seq
            if len(seq) > limit:
                raise GraphError(f"the schedule does not repeat within {limit} problem steps; "
                                 "check the steps of each problem")

    # -- display ----------------------------------------------------------------------------
    def describe(self) -> str:
        lines = ["problems:"]
        for n in self.names:
            reads = f", reads {', '.join(self.reads[n])}" if self.reads[n] else ""
            lines.append(f"  {n}: {self.steps[n]} step(s) per upper step{reads}")
        lines.append("dependencies (upper -> lower):")
        for d in self.dependencies:
            m = self.method_for(d.upper, d.lower)
            extra = "".join(["; keeps the lower's " + m.keeps.value if m.keeps.value != "nothing" else "",
                             "; keeps the lower's last step's gradient"
                             if m.applied_gradient and m.keeps is not Keep.STEP_GRADIENT else "",
                             "; second order" if m.second_order else ""])
            lines.append(f"  {d.upper} -> {d.lower}  [{m}{extra}]")
        lines.append("schedule (one outer step): " + " ".join(self.cycle()))
        lines.append("hypergradient paths:")
        any_path = False
        for n in self.names:
            plan = self.plans.get(n)
            for path in self.paths(n):
                any_path = True
                hops = [f"{p} ({plan.methods[p].name})" for p in path[1:-1]]
                lines.append(f"  {n}: " + " -> ".join([n] + hops + [n]))
        if not any_path:
            lines.append("  none: every problem uses its direct gradient")
        return "\n".join(lines)

    def mermaid(self) -> str:
        lines = ["graph TD"]
        for n in self.names:
            lines.append(f"  {n}[\"{n} (K={self.steps[n]})\"]")
        for d in self.dependencies:
            lines.append(f"  {d.upper} -->|{self.method_for(d.upper, d.lower).name}| {d.lower}")
        for n in self.names:
            for r in self.reads[n]:
                lines.append(f"  {n} -.reads.-> {r}")
        return "\n".join(lines)


def _name_and_options(method: "str | Method", options: Mapping[str, Any]) -> tuple[str, dict[str, Any]]:
    """A method given as a name and options, or as an object (its values, then ``options``)."""
    if isinstance(method, Method):
        return method.name, {**method.values(), **options}
    return method, dict(options)
