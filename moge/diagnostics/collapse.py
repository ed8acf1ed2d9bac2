"""Routing-collapse warnings during training: entropy, effective experts, logit growth, dead experts.

Legend: T tokens, E experts, K experts per token.

Every training step the trainer hands the monitor the routing of its last micro-batch
(one `MoGEOutput` per MoE layer); every `monitor.every` steps the monitor summarises the
window per layer and warns when a statistic crosses its threshold in the `monitor`
config section:

- load_entropy: entropy (nats) of the share of token-slots each expert received over the
  window; effective_experts = exp(load_entropy), E when the load is even, 1 when one
  expert takes everything (MoGE's per-group quota keeps it >= M). Warned below
  `min_effective_share * E`.
- score_entropy: mean per-token entropy of the router's softmax scores (how sure the
  router is), reported only.
- logit_rms: mean over tokens of the root-mean-square of the router logits centred per
  token (softmax ignores a per-token constant, so that is all the scores determine; they
  are recovered exactly from the scores as log s - mean log s, or log(s / (1 - s)) for
  sigmoid). logit_growth = logit_rms / the run's first window's (a resumed run reads
  it from metrics.jsonl, `CollapseMonitor.resume`). Warned above `max_logit_growth`.
- dead_experts: experts that received no token in the whole window. Warned above
  `max_dead_experts`.

A warning is logged when a layer's statistic crosses into the bad side and again only
after it has recovered and crossed once more; every summary is also written to
metrics.jsonl as {"type": "collapse", "step", "layers": [...], "warnings": [...]}.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, fields

import torch
from torch import Tensor

from moge.balance import load_entropy, score_entropy

_TINY = 1e-30  # floor of a score before its log: float32 softmax underflows past ~1e-38


# ---------------------------------------------------------------- statistics


def centred_logits(scores_TE: Tensor, score_func: str) -> Tensor:
    """Router logits minus their per-token mean, recovered from the scores [T, E]."""
    s_TE = scores_TE.detach().double()
    if score_func == "sigmoid":
        s_TE = s_TE.clamp(_TINY, 1.0 - 1e-15)
        logits_TE = s_TE.log() - (-s_TE).log1p()
    else:
        logits_TE = s_TE.clamp_min(_TINY).log()
    return logits_TE - logits_TE.mean(-1, keepdim=True)


def logit_rms(scores_TE: Tensor, score_func: str) -> float:
    """Mean over tokens of the RMS over experts of the centred router logits."""
    c_TE = centred_logits(scores_TE, score_func)
    return float(c_TE.pow(2).mean(-1).sqrt().mean())


@dataclass(frozen=True)
class LayerCollapse:
    """One MoE layer's statistics over one monitoring window."""

    layer: int  # block index (depth)
    tokens: int  # tokens observed in the window
    load_entropy: float  # nats
    effective_experts: float  # exp(load_entropy)
    score_entropy: float  # nats, mean per token
    logit_rms: float  # mean RMS of the centred router logits
    logit_growth: float  # logit_rms / the run's first window's
    dead_experts: int  # experts without a token in the window


_FIELDS = frozenset(f.name for f in fields(LayerCollapse))  # what a collapse record holds per layer


@dataclass(frozen=True)
class Thresholds:
    """When to warn (see MonitorConfig in moge.training.config for the meaning of each)."""

    min_effective_share: float = 0.0
    max_logit_growth: float = 0.0
    max_dead_experts: int = -1


def layer_warnings(stats: LayerCollapse, num_experts: int, limits: Thresholds) -> dict[str, str]:
    """{statistic: message} for every threshold this layer is past (0 / -1: never)."""
    out = {}
    floor = limits.min_effective_share * num_experts
    if limits.min_effective_share > 0 and stats.effective_experts < floor:
        out["effective_experts"] = (
            f"layer {stats.layer}: effective experts exp(entropy) = {stats.effective_experts:.2f} of "
            f"{num_experts}, below monitor.min_effective_share={limits.min_effective_share} "
            f"({floor:.2f}): routing is collapsing onto few experts"
        )
    if limits.max_logit_growth > 0 and stats.logit_growth > limits.max_logit_growth:
        out["logit_growth"] = (
            f"layer {stats.layer}: router-logit RMS {stats.logit_rms:.3f} is {stats.logit_growth:.1f}x its "
            f"first value, above monitor.max_logit_growth={limits.max_logit_growth}"
        )
    if limits.max_dead_experts >= 0 and stats.dead_experts > limits.max_dead_experts:
        out["dead_experts"] = (
            f"layer {stats.layer}: {stats.dead_experts} of {num_experts} experts got no token in the "
            f"window, above monitor.max_dead_experts={limits.max_dead_experts}"
        )
    return out


# ---------------------------------------------------------------- the monitor


class _Window:
    """One layer's running sums between two summaries."""

    def __init__(self, num_experts: int) -> None:
        self.load_E = torch.zeros(num_experts, dtype=torch.int64)
        self.tokens = 0
        self.score_entropy_sum = 0.0
        self.logit_rms_sum = 0.0

    def add(self, ids_TK: Tensor, scores_TE: Tensor, score_func: str, mask_T: Tensor | None = None) -> None:
        """One call's routing; padded tokens (mask_T False) are left out."""
        if mask_T is not None:
            ids_TK, scores_TE = ids_TK[mask_T], scores_TE[mask_T]
        T = scores_TE.shape[0]
        if T == 0:
            return
        self.load_E += torch.bincount(ids_TK.detach().reshape(-1).cpu(), minlength=len(self.load_E))
        self.tokens += T
        self.score_entropy_sum += float(score_entropy(scores_TE.double())) * T
        self.logit_rms_sum += logit_rms(scores_TE, score_func) * T


class CollapseMonitor:
    """Summaries and threshold warnings of the routing of every MoE layer (see the module doc).

    layers: block index of every MoE layer, in the order of ModelOutput.routing;
    num_experts, score_funcs: per layer. every: steps per window (0: the monitor is off).
    """

    def __init__(
        self,
        layers: Sequence[int],
        num_experts: Sequence[int],
        score_funcs: Sequence[str],
        every: int,
        thresholds: Thresholds = Thresholds(),
    ) -> None:
        assert len(layers) == len(num_experts) == len(score_funcs), "one entry per MoE layer"
        self.layers, self.num_experts, self.score_funcs = list(layers), list(num_experts), list(score_funcs)
        self.every, self.thresholds = every, thresholds
        self._windows = [_Window(e) for e in self.num_experts]
        self._first_rms: list[float | None] = [None] * len(self.layers)
        self._active: set[tuple[int, str]] = set()  # (layer, statistic) currently past its threshold

    @classmethod
    def for_model(cls, cfg, model) -> CollapseMonitor:
        """A monitor for a MoGETransformer trained with RunConfig `cfg` (its `monitor` section)."""
        m = cfg.monitor
        moe = list(model.moe_layers())
        layers = [i for i, block in enumerate(model.blocks) if any(block.ffn is layer for layer in moe)]
        limits = Thresholds(m.min_effective_share, m.max_logit_growth, m.max_dead_experts)
        return cls(
            layers,
            [layer.config.num_experts for layer in moe],
            [layer.config.score_func for layer in moe],
            m.every,
            limits,
        )

    def resume(self, records: Sequence[dict]) -> None:
        """Carry the state of a resumed run over from its metrics records (those up to the
        checkpoint): each layer's first logit RMS, the reference of logit_growth, and the
        thresholds it was past at the last check, so the resumed run reports and warns as
        one that never stopped (else growth restarts at 1.0 and a collapse goes unwarned).
        Records up to an "extract" record (moge extract copies its source's metrics) are
        another model's router, so only those after the last one count."""
        cut = max((i + 1 for i, r in enumerate(records) if r.get("type") == "extract"), default=0)
        checks = [r for r in records[cut:] if r.get("type") == "collapse"]
        for i, (layer, E) in enumerate(zip(self.layers, self.num_experts)):
            # A record of other fields (another version's) is skipped, not a crash.
            seen = [
                s
                for r in checks
                for s in r.get("layers", [])
                if s.get("layer") == layer and s.keys() >= _FIELDS
            ]
            if seen:
                self._first_rms[i] = seen[0]["logit_rms"]
                last = LayerCollapse(**{k: seen[-1][k] for k in _FIELDS})
                self._active |= {(layer, name) for name in layer_warnings(last, E, self.thresholds)}

    def observe(self, routing: Sequence) -> None:
        """Add one forward's routing (MoGEOutput per MoE layer: expert_ids, scores)."""
        assert len(routing) == len(self._windows), "one MoGEOutput per MoE layer"
        for window, routed, func in zip(self._windows, routing, self.score_funcs):
            window.add(routed.expert_ids, routed.scores, func, getattr(routed, "token_mask", None))

    def summarise(self) -> tuple[list[LayerCollapse], list[str]]:
        """Statistics of the window so far and the warnings of newly crossed thresholds; resets."""
        stats, warnings = [], []
        for i, (window, E) in enumerate(zip(self._windows, self.num_experts)):
            if window.tokens == 0:
                continue
            rms = window.logit_rms_sum / window.tokens
            if self._first_rms[i] is None:
                self._first_rms[i] = rms
            first = self._first_rms[i]
            h = load_entropy(window.load_E)
            s = LayerCollapse(
                layer=self.layers[i],
                tokens=window.tokens,
                load_entropy=h,
                effective_experts=math.exp(h),
                score_entropy=window.score_entropy_sum / window.tokens,
                logit_rms=rms,
                logit_growth=rms / first if first and first > 0 else 1.0,
                dead_experts=int((window.load_E == 0).sum()),
            )
            stats.append(s)
            crossed = layer_warnings(s, E, self.thresholds)
            for name, message in crossed.items():
                if (s.layer, name) not in self._active:
                    warnings.append(message)
            self._active -= {(s.layer, n) for n in ("effective_experts", "logit_growth", "dead_experts")}
            self._active |= {(s.layer, n) for n in crossed}
        self._windows = [_Window(e) for e in self.num_experts]
        return stats, warnings

    def after_step(
        self, step: int, routing: Sequence, write: Callable[[dict], None], log: Callable[[str], None]
    ) -> dict | None:
        """The trainer's hook: observe, and every `every` steps write a record and log warnings."""
        if self.every <= 0 or not self.layers:
            return None
        self.observe(routing)
        if step % self.every:
            return None
        stats, warnings = self.summarise()
        record = {
            "type": "collapse",
            "step": step,
            "layers": [asdict(s) for s in stats],
            "warnings": warnings,
        }
        write(record)
        for message in warnings:
            log(f"step {step} | warning: {message}")
        return record
