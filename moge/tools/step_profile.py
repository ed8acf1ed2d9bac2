"""Where a training step's time goes, by op group, forward and backward (torch.profiler).

Legend: none (no tensors here).

Every module of a group (embedding, norms, attention, the MoE layer's router and losses,
its routed and shared experts, a dense FFN) opens a profiler scope while its forward
runs; every op's self time goes to the innermost scope around it. A backward op goes to
the group whose forward created its autograd node (the profiler gives both the same
sequence number), so the MoE layer's hand-written backward counts as routed experts, the
router's softmax backward as router. What the step runs outside the model has scopes of
its own: the loss, clipping, AdamW, zero_grad and end_step. Self times sum to the
profiled step: each group's share is exact for that run, though the profiler's own
overhead (a few us an op) weighs more on groups of many small ops. `aten::item` calls are
counted (on CPU a host sync costs nothing more than the op). Minor page faults per step,
from getrusage around unprofiled steps, show the allocator's churn. Around the same
steps every fused expert call's plan is counted: how many chunks ran as one bmm and
how many as one mm per expert, and the padding rows' share of the slots (the training
routing decides this, not the layer benchmark's random router: see docs/performance.md).
"""

from __future__ import annotations

import contextlib
import resource
from collections import defaultdict
from collections.abc import Callable, Iterator

from torch import nn
from torch.autograd.profiler import record_function
from torch.profiler import ProfilerActivity, profile

from moge.experts import GroupedExperts, SwiGLU
from moge.layer import MoGELayer
from moge.model.transformer import Attention, Block, RMSNorm

SCOPE = "moge.group::"
BACKWARD = "autograd::engine::evaluate_function: "
GROUPS = (
    "embedding", "norms", "attention", "router and losses", "routed experts", "shared expert", "dense FFN",
    "residual adds", "head, loss, aux sum", "backward: gradient accumulation", "clip", "optimizer (AdamW)",
    "zero_grad", "end_step", "other",
)  # fmt: skip
STEP_GROUPS = ("clip", "optimizer (AdamW)", "zero_grad", "end_step", "other")  # outside the model


def module_groups(model: nn.Module) -> dict[nn.Module, str]:
    """The profiled modules of a moge model and their groups (the model itself: its head)."""
    groups: dict[nn.Module, str] = {model: "head, loss, aux sum"}
    for m in model.modules():
        if isinstance(m, Block):
            groups[m] = "residual adds"  # what a block runs besides its children
        elif isinstance(m, nn.Embedding):
            groups[m] = "embedding"
        elif isinstance(m, RMSNorm):
            groups[m] = "norms"
        elif isinstance(m, Attention):
            groups[m] = "attention"
        elif isinstance(m, MoGELayer):
            groups[m] = "router and losses"
            groups[m.experts] = "routed experts"
            if m.shared is not None:
                groups[m.shared] = "shared expert"
        elif isinstance(m, SwiGLU) and m not in groups:
            groups[m] = "dense FFN"
    groups.update({m: "routed experts" for m in model.modules() if isinstance(m, GroupedExperts)})
    return groups


@contextlib.contextmanager
def scoped(groups: dict[nn.Module, str]) -> Iterator[None]:
    """Every module in `groups` runs its forward inside a profiler scope named for its group."""
    open_: list = []

    def enter(module, *args, **kwargs):
        scope = record_function(SCOPE + groups[module])
        scope.__enter__()
        open_.append(scope)

    def leave(module, *args, **kwargs):
        open_.pop().__exit__(None, None, None)

    handles = []
    for module in groups:
        handles.append(module.register_forward_pre_hook(enter, with_kwargs=True))
        handles.append(module.register_forward_hook(leave, always_call=True))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def step_scope(name: str):
    """A profiler scope for the step's own work (clip, optimizer, ...); one of GROUPS."""
    assert name in GROUPS, name
    return record_function(SCOPE + name)


def _scope_of(event) -> str | None:
    while event is not None:
        if event.name.startswith(SCOPE):
            return event.name[len(SCOPE) :]
        event = event.cpu_parent
    return None


def _backward_node(event):
    while event is not None:
        if event.name.startswith(BACKWARD):
            return event
        event = event.cpu_parent
    return None


def attribute(events) -> dict[tuple[str, str], float]:
    """{(group, "forward" | "backward" | "step"): self ms} over profiler events."""
    seq_group: dict[int, str] = {}
    for e in events:
        if e.sequence_nr >= 0 and _backward_node(e) is None:
            group = _scope_of(e)
            if group is not None:
                seq_group.setdefault(e.sequence_nr, group)
    out: dict[tuple[str, str], float] = defaultdict(float)
    for e in events:
        if e.name.startswith(SCOPE):
            continue  # a scope's own self time is the hooks' (profiler) overhead
        node = _backward_node(e)
        if node is not None:
            group = seq_group.get(node.sequence_nr, "backward: gradient accumulation")
            phase = "backward"
        else:
            group = _scope_of(e) or "other"
            phase = "step" if group in STEP_GROUPS else "forward"
        out[(group, phase)] += e.self_cpu_time_total / 1e3
    return dict(out)


CHUNK_KINDS = ("one bmm", "one mm per expert")


@contextlib.contextmanager
def counting_chunks(model: nn.Module) -> Iterator[dict[str, int]]:
    """Inside: every fused-path plan of `model`'s GroupedExperts is counted into the
    yielded dict: chunks by kind (CHUNK_KINDS: equal row counts run as one bmm, else one
    mm per expert), and the plans' rows and slots (rows - slots: padding). Each module's
    plan method is shadowed by a counting one for the duration, then restored."""
    counts = dict.fromkeys((*CHUNK_KINDS, "rows", "slots"), 0)

    def counting(plan_fn):
        def plan(*args, **kwargs):
            order_S, fused, cols = plan_fn(*args, **kwargs)
            for chunk in fused.chunks:
                counts[CHUNK_KINDS[chunk.cap is None]] += 1
            counts["rows"] += fused.num_rows
            counts["slots"] += fused.num_slots
            return order_S, fused, cols

        return plan

    shadowed = [m for m in model.modules() if isinstance(m, GroupedExperts)]
    for m in shadowed:
        vars(m)["_fused_plan"] = counting(m._fused_plan)  # an instance attribute over the method
    try:
        yield counts
    finally:
        for m in shadowed:
            del vars(m)["_fused_plan"]


def _chunk_stats(counts: dict[str, int], steps: int) -> dict[str, float]:
    """counting_chunks' counts per step, and the padding rows in % of the slots."""
    out = {k: counts[k] / steps for k in CHUNK_KINDS}
    out["padding %"] = 100 * (counts["rows"] - counts["slots"]) / max(counts["slots"], 1)
    return out


def profile_steps(model: nn.Module, step: Callable[[], None], steps: int) -> dict:
    """Profile `steps` calls of step() (one optimiser step of `model` each, already warm).

    Returns {"ms": {(group, phase): ms per step}, "items": aten::item calls per step,
    "faults": minor page faults per step, "chunks": the fused plans' chunks per step by
    kind and their padding % (counting_chunks; both from unprofiled steps)}.
    """
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    with counting_chunks(model) as counts:
        for _ in range(steps):
            step()
    faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / steps
    with scoped(module_groups(model)), profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            step()
    events = prof.events()
    ms = {k: v / steps for k, v in attribute(events).items()}
    items: dict[str, float] = defaultdict(float)
    for e in events:
        if e.name == "aten::item":
            items[_scope_of(e) or "other"] += 1 / steps
    return {"ms": ms, "items": dict(items), "faults": faults, "chunks": _chunk_stats(counts, steps)}


def merge_profiles(profiles: list[dict]) -> dict:
    """The mean of several profile_steps results of one model (e.g. one per round)."""
    n = len(profiles)
    out: dict = {
        "ms": defaultdict(float),
        "items": defaultdict(float),
        "chunks": defaultdict(float),
        "faults": 0.0,
    }
    for p in profiles:
        for key in ("ms", "items", "chunks"):
            for k, v in p.get(key, {}).items():
                out[key][k] += v / n
        out["faults"] += p["faults"] / n
    return {key: dict(v) if isinstance(v, defaultdict) else v for key, v in out.items()}


def format_profiles(profiles: dict[str, dict]) -> str:
    """One column triple (forward or step ms, backward ms, share) per model, one row per
    group, then the host syncs (aten::item calls by group), the page faults and the fused
    plans' chunks (where a profile has them)."""
    names = list(profiles)
    lines = [f"{'':34}" + "".join(f" {f'[{i + 1}]':>27}" for i in range(len(names)))]
    lines.append(
        f"{'group (ms per step)':34}" + "".join(f" {'fwd':>8} {'bwd':>8} {'share':>9}" for _ in names)
    )
    totals = {n: sum(p["ms"].values()) for n, p in profiles.items()}
    for g in GROUPS:
        cells, seen = [], False
        for n in names:
            ms = profiles[n]["ms"]
            f = ms.get((g, "forward"), 0.0) + ms.get((g, "step"), 0.0)
            b = ms.get((g, "backward"), 0.0)
            seen |= f + b > 0
            cells.append(f" {f:8.1f} {b:8.1f} {100 * (f + b) / totals[n]:8.1f}%")
        if seen:
            lines.append(f"{g:34}" + "".join(cells))
    lines.append(
        f"{'total (profiled)':34}" + "".join(f" {'':8} {totals[n]:8.1f} {'100.0%':>9}" for n in names)
    )
    for g in GROUPS:
        if any(profiles[n]["items"].get(g) for n in names):
            counts = "".join(f" {profiles[n]['items'].get(g, 0):26.0f}" for n in names)
            lines.append(f"{'aten::item calls: ' + g:34}" + counts)
    faults = "".join(f" {profiles[n]['faults']:26.0f}" for n in names)
    lines.append(f"{'minor page faults (unprofiled)':34}" + faults)
    if any(profiles[n].get("chunks") for n in names):
        for kind in (*CHUNK_KINDS, "padding %"):
            row = "".join(f" {profiles[n].get('chunks', {}).get(kind, 0):26.1f}" for n in names)
            label = "fused padding rows, % of slots" if kind == "padding %" else f"fused chunks: {kind}"
            lines.append(f"{label:34}" + row)
    lines += [f"[{i + 1}] {n}" for i, n in enumerate(names)]
    return "\n".join(lines)
