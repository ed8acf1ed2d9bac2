"""The "intrinsic fingerprint" of a model's attention weights, with a significance test.

Legend: L layers (N, M: the depths of the two models being compared), P permutations or
bootstrap resamples.

The published method (arXiv 2507.03014): for every layer, the standard deviation of all
entries of the Q, K, V and O projection weights; each per-layer sequence z-normalised
across layers; two models compared by the Pearson correlation of their sequences. Here
the same is done on eight signals, each a per-layer profile of one tensor's std:

    q, k, v, o              the projection weights (the published signals)
    q_bias, k_bias, v_bias  the QKV biases (absent unless the model has them)
    attn_norm               the attention RMSNorm weight

Pearson's r is unchanged by z-normalisation (an affine map), which is therefore only used
for drawing. Combined rows: "qkvo" is the arithmetic mean of the defined q, k, v, o
correlations (the paper's combination is not certain; a plain mean is the common
re-implementation), "qkv_bias" the mean of the three bias correlations. A flat profile
(every layer the same, e.g. norms still at their init of ones) leaves r undefined: it is
reported as such, never as NaN.

Depths differ: the shorter profile is linearly interpolated onto the longer one's relative
depths (layer i of N sits at i / (N - 1)).

What the method lacks, added here:
- p: a one-sided permutation p-value. Model B's layers are shuffled (the same shuffle for
  every signal of a combined row), re-interpolated and re-correlated; p is the share of
  shuffles whose r reaches the observed one. Exact (every permutation) when N! is at most
  the number asked for, else Monte-Carlo with the usual +1 correction. It tests "the
  order of B's layers carries no information about A's", not "A and B are unrelated":
  two unrelated models whose profiles both trend with depth pass it easily.
- ci: a percentile bootstrap interval of r over the aligned layers (seeded).
- r_diff: the correlation of the profiles' first differences (layer-to-layer changes),
  which a shared smooth trend does not inflate.

Reading is lazy: one tensor at a time through safetensors' safe_open, so any model size
works. Sources: a moge run folder or checkpoint folder (keys blocks.<i>.attn.q_proj.weight,
blocks.<i>.attn_norm.weight), a Hugging Face style folder (model.safetensors or shards
listed in model.safetensors.index.json; keys model.layers.<i>.self_attn.q_proj.weight,
model.layers.<i>.input_layernorm.weight: Qwen2, Qwen3-MoE, Mixtral, Llama, Pangu), or one
.safetensors file of either kind.
"""

from __future__ import annotations

import itertools
import json
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

PROJ_SIGNALS = ("q", "k", "v", "o")
BIAS_SIGNALS = ("q_bias", "k_bias", "v_bias")
NORM_SIGNALS = ("attn_norm",)
SIGNALS = PROJ_SIGNALS + BIAS_SIGNALS + NORM_SIGNALS
COMBINED: dict[str, tuple[str, ...]] = {"qkvo": PROJ_SIGNALS, "qkv_bias": BIAS_SIGNALS}
MIN_LAYERS = 3  # Pearson's r over 2 points is always +-1
_FLAT_RTOL = 1e-9  # a profile whose spread is below this share of its size is flat
_CHUNK = 1 << 22  # elements per float64 chunk when taking a tensor's std

# layer index, projection letter, weight/bias, or the norm's name
_KEY_PATTERNS = {
    # A checkpoint's shards name the model's tensors "model.<name>" (optimizer state "optim.").
    "moge": re.compile(
        r"^(?:model\.)?()blocks\.(\d+)\.(?:attn\.([qkvo])_proj\.(weight|bias)|(attn_norm)\.weight)$"
    ),
    "hf": re.compile(
        r"^(.*\.)?layers\.(\d+)\.(?:self_attn\.([qkvo])_proj\.(weight|bias)|(input_layernorm)\.weight)$"
    ),
}


# ---------------------------------------------------------------- statistics on sequences


def _summary(t: torch.Tensor) -> tuple[int, float, float]:
    """(count, mean, M2) of all entries, in float64 chunks (bounded extra memory)."""
    flat = t.detach().reshape(-1)
    n, mean, m2 = 0, 0.0, 0.0
    for chunk in flat.split(_CHUNK):
        c = chunk.to(torch.float64)
        n, mean, m2 = _merge((n, mean, m2), (c.numel(), float(c.mean()), float(((c - c.mean()) ** 2).sum())))
    return n, mean, m2


def _merge(a: tuple[int, float, float], b: tuple[int, float, float]) -> tuple[int, float, float]:
    """Chan et al.'s merge of two (count, mean, M2) summaries."""
    (na, ma, m2a), (nb, mb, m2b) = a, b
    total = na + nb
    if total == 0:
        return 0, 0.0, 0.0
    delta = mb - ma
    return total, ma + delta * nb / total, m2a + m2b + delta * delta * na * nb / total


def _std(summary: tuple[int, float, float]) -> float:
    n, _, m2 = summary
    return math.sqrt(m2 / (n - 1)) if n > 1 else 0.0


def tensor_std(t: torch.Tensor) -> float:
    """Sample std (correction 1) of all entries, in float64 chunks (bounded extra memory)."""
    return _std(_summary(t))


def is_flat(values: Sequence[float]) -> bool:
    """Whether a profile has (numerically) zero variance across layers."""
    x = torch.as_tensor(values, dtype=torch.float64)
    spread = float(x.max() - x.min())
    return spread <= _FLAT_RTOL * float(x.abs().max())


def z_normalise(values: Sequence[float]) -> list[float] | None:
    """(x - mean) / std across layers (population std); None for a flat profile."""
    if is_flat(values):
        return None
    x = torch.as_tensor(values, dtype=torch.float64)
    return ((x - x.mean()) / x.std(correction=0)).tolist()


def interpolation_matrix(n: int, m: int) -> torch.Tensor:
    """W [m, n] float64: W @ x samples the n-point profile x at m evenly spaced relative depths."""
    if n == m:
        return torch.eye(n, dtype=torch.float64)
    pos_M = torch.linspace(0.0, n - 1.0, m, dtype=torch.float64)
    lo_M = pos_M.floor().long().clamp(max=n - 2)
    frac_M = pos_M - lo_M
    W_MN = torch.zeros(m, n, dtype=torch.float64)
    rows = torch.arange(m)
    W_MN[rows, lo_M] = 1.0 - frac_M
    W_MN[rows, lo_M + 1] += frac_M
    return W_MN


def interpolate(values: Sequence[float], length: int) -> list[float]:
    """A profile linearly resampled to `length` layers (endpoints kept)."""
    x = torch.as_tensor(values, dtype=torch.float64)
    return (interpolation_matrix(x.numel(), length) @ x).tolist()


def _pearson_rows(x_PM: torch.Tensor, y_PM: torch.Tensor) -> torch.Tensor:
    """Row-wise Pearson r [P]; NaN where a row has zero variance."""
    xc = x_PM - x_PM.mean(-1, keepdim=True)
    yc = y_PM - y_PM.mean(-1, keepdim=True)
    den = torch.sqrt((xc * xc).sum(-1) * (yc * yc).sum(-1))
    r = (xc * yc).sum(-1) / den
    return torch.where(den > 0, r.clamp(-1.0, 1.0), torch.full_like(r, math.nan))


def pearson(a: Sequence[float], b: Sequence[float]) -> float | None:
    """Pearson r of two equally long sequences; None when either is flat."""
    if len(a) != len(b):
        raise ValueError(f"pearson: lengths differ ({len(a)} vs {len(b)}); interpolate first")
    if len(a) < 2 or is_flat(a) or is_flat(b):
        return None
    x = torch.as_tensor(a, dtype=torch.float64)[None]
    y = torch.as_tensor(b, dtype=torch.float64)[None]
    return float(_pearson_rows(x, y)[0])


# ---------------------------------------------------------------- one comparison


@dataclass(frozen=True)
class Settings:
    """permutations: shuffles for p (exact when N! <= permutations); bootstrap: resamples for ci."""

    permutations: int = 2000
    bootstrap: int = 1000
    confidence: float = 0.95
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("permutations", "bootstrap"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name}: expected an integer >= 0, got {value!r}")
        if not 0.0 < self.confidence < 1.0:
            raise ValueError(f"confidence: expected a value in (0, 1), got {self.confidence}")


@dataclass(frozen=True)
class SignalResult:
    """One row of a comparison. r, p, ci, r_diff are None when undefined (see note)."""

    signal: str
    r: float | None
    p: float | None = None
    p_exact: bool = False  # every permutation enumerated
    ci: tuple[float, float] | None = None
    r_diff: float | None = None
    note: str = ""


def _permutations(n: int, count: int, gen: torch.Generator) -> tuple[torch.Tensor, bool]:
    """Layer orders [P, n] int64 and whether they are all n! of them."""
    if n <= 10 and math.factorial(n) <= count:
        return torch.tensor(list(itertools.permutations(range(n))), dtype=torch.long), True
    keys = torch.rand(count, n, generator=gen, dtype=torch.float64)
    return keys.argsort(dim=1), False


def _mean_r(a_SM: torch.Tensor, b_SPM: torch.Tensor) -> torch.Tensor:
    """Mean over signals of row-wise r: a [S, M] vs b [S, P, M] -> [P]."""
    r_SP = torch.stack([_pearson_rows(a_SM[s].expand_as(b_SPM[s]), b_SPM[s]) for s in range(len(a_SM))])
    return r_SP.mean(0)


def _statistic_rows(
    a_SN, b_SN, settings: Settings
) -> tuple[float, float | None, bool, tuple | None, float | None]:
    """(r, p, exact, ci, r_diff) of the mean-over-signals correlation of aligned profiles.

    a_SN [S, N], b_SN [S, N'] float64, none flat; B's layers are the ones shuffled.
    """
    n_a, n_b = a_SN.shape[1], b_SN.shape[1]
    m = max(n_a, n_b)
    Wa_MN, Wb_MN = interpolation_matrix(n_a, m), interpolation_matrix(n_b, m)
    a_SM, b_SM = a_SN @ Wa_MN.T, b_SN @ Wb_MN.T
    r = float(_mean_r(a_SM, b_SM[:, None])[0])
    gen = torch.Generator().manual_seed(settings.seed)
    p, exact = None, False
    if settings.permutations:
        order_PN, exact = _permutations(n_b, settings.permutations, gen)
        b_SPM = b_SN[:, order_PN] @ Wb_MN.T
        null_P = _mean_r(a_SM, b_SPM)
        hits = int((null_P >= r - 1e-12).sum())  # NaN (a degenerate shuffle) never counts
        p = hits / len(order_PN) if exact else (hits + 1) / (len(order_PN) + 1)
    ci = None
    if settings.bootstrap:
        idx_PM = torch.randint(0, m, (settings.bootstrap, m), generator=gen)
        a_SPM, b_SPM = a_SM[:, idx_PM], b_SM[:, idx_PM]
        boot_P = torch.stack([_pearson_rows(a_SPM[s], b_SPM[s]) for s in range(len(a_SM))]).mean(0)
        boot_P = boot_P[~boot_P.isnan()]  # resamples that drew one layer over and over
        if boot_P.numel():
            tail = (1.0 - settings.confidence) / 2
            lo, hi = torch.quantile(boot_P, torch.tensor([tail, 1.0 - tail], dtype=torch.float64)).tolist()
            ci = (lo, hi)
    r_diff = None
    if m >= MIN_LAYERS + 1:
        d_a, d_b = a_SM.diff(dim=1), b_SM.diff(dim=1)
        value = float(_mean_r(d_a, d_b[:, None])[0])
        r_diff = None if math.isnan(value) else value
    return r, p, exact, ci, r_diff


def compare_signals(
    a: Mapping[str, Sequence[float] | None],
    b: Mapping[str, Sequence[float] | None],
    signals: Sequence[str],
    settings: Settings = Settings(),
    label: str | None = None,
) -> SignalResult:
    """The mean correlation over `signals` of two profile sets (one signal: its own r).

    Signals absent from either model or flat in either are left out and named in the
    note; with none left the result is undefined (r None).
    """
    label = label or signals[0]
    used: list[str] = []
    rows_a: list[list[float]] = []
    rows_b: list[list[float]] = []
    notes = []
    for s in signals:
        pa, pb = a.get(s), b.get(s)
        if pa is None or pb is None:
            notes.append(
                f"{s} absent in {'A' if pa is None else 'B'}" + (" and B" if pa is pb is None else "")
            )
        elif min(len(pa), len(pb)) < MIN_LAYERS:
            notes.append(f"{s}: fewer than {MIN_LAYERS} layers")
        elif is_flat(pa) or is_flat(pb):
            flat = [n for n, p in (("A", pa), ("B", pb)) if is_flat(p)]
            notes.append(f"{s} flat in {' and '.join(flat)} (zero variance across layers)")
        else:
            used.append(s)
            rows_a.append(list(pa))
            rows_b.append(list(pb))
    note = "; ".join(notes)
    if not used:
        return SignalResult(label, None, note=note or "no signal")
    if len(signals) > 1:
        note = f"mean of {','.join(used)}" + (f"; {note}" if note else "")
    a_SN = torch.tensor(rows_a, dtype=torch.float64)
    b_SN = torch.tensor(rows_b, dtype=torch.float64)
    r, p, exact, ci, r_diff = _statistic_rows(a_SN, b_SN, settings)
    return SignalResult(label, r, p, exact, ci, r_diff, note)


# ---------------------------------------------------------------- reading models


@dataclass(frozen=True)
class Profile:
    """Per-layer std of every signal of one model; a signal the model lacks is None."""

    name: str
    source: str
    layout: str  # "moge" or "hf"
    n_layers: int
    values: dict[str, list[float] | None] = field(default_factory=dict)


def _safetensors_files(path: Path) -> list[Path]:
    """The weight files of a model folder, a moge run/checkpoint, or a single file."""
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such model folder or file")
    if path.is_file():
        if path.suffix != ".safetensors":
            raise ValueError(f"{path}: expected a .safetensors file or a model folder")
        return [path]
    # model.safetensors first, as transformers' from_pretrained (and LayoutFolder) read a
    # folder holding both: a sharded save over a single-file one leaves such folders.
    if (path / "model.safetensors").is_file():
        return [path / "model.safetensors"]
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise ValueError(f"{index}: not a safetensors index with a weight_map ({err})") from err
        return [path / name for name in sorted(set(weight_map.values()))]
    if (path / "checkpoints").is_dir() or (path / "LATEST").is_file() or (path / "state.json").is_file():
        from moge.training.checkpoint import RNG_FILE, find_checkpoint

        # Every rank's shard file: a tensor sharded over ranks is read piece by piece.
        return sorted(f for f in find_checkpoint(path).glob("*.safetensors") if f.name != RNG_FILE)
    found = sorted(path.glob("*.safetensors"))
    if not found:
        raise FileNotFoundError(
            f"{path}: no model.safetensors, model.safetensors.index.json or moge checkpoint found"
        )
    return found


def _index_keys(files: Sequence[Path]) -> tuple[str, dict[tuple[str, int], list[tuple[Path, str]]]]:
    """The layout and where every (signal, layer) tensor lives: [(file, key)], one entry per
    piece (a sharded checkpoint holds a tensor in several files).

    Keys are grouped by layout and by the prefix before `layers.` (model., or
    model.language_model. beside a vision tower's encoder.layers.): the group with the
    most attention tensors is the model's decoder.
    """
    where: dict[tuple[str, str], dict[tuple[str, int], list[tuple[Path, str]]]] = {}
    for file in files:
        try:
            with safe_open(str(file), framework="pt") as f:
                keys = list(f.keys())  # noqa: SIM118 (safe_open is not iterable)
        except (SafetensorError, OSError) as err:
            raise ValueError(f"{file}: not a readable safetensors file ({err})") from err
        for key in keys:
            for layout, pattern in _KEY_PATTERNS.items():
                m = pattern.match(key)
                if m:
                    prefix, layer, proj, kind, norm = m.groups()
                    signal = "attn_norm" if norm else (proj if kind == "weight" else f"{proj}_bias")
                    if signal in SIGNALS:  # o_bias is not one of the signals
                        group = where.setdefault((layout, prefix or ""), {})
                        group.setdefault((signal, int(layer)), []).append((file, key))
    best = max(where, key=lambda k: len(where[k]), default=None)
    if best is None or not any(s == "q" for s, _ in where[best]):
        names = ", ".join(str(f) for f in files)
        raise ValueError(
            f"{names}: no attention projection weights found (expected keys like "
            "blocks.0.attn.q_proj.weight or model.layers.0.self_attn.q_proj.weight)"
        )
    return best[0], where[best]


_WEIGHT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _check_unquantized(t: torch.Tensor, file: Path, key: str) -> None:
    """ValueError unless `t` holds the weights themselves: FP8 or integer codes (scaled by a
    weight_scale_inv or similar beside them) have a std that is not the weights'."""
    if t.dtype not in _WEIGHT_DTYPES:
        raise ValueError(
            f"{file}: {key} holds quantized codes ({str(t.dtype).removeprefix('torch.')}), whose std is "
            "not the weights'; dequantize the model first (e.g. to bfloat16)"
        )


def read_profile(path: str | Path, name: str | None = None) -> Profile:
    """The fingerprint profile of the model at `path`, reading one tensor at a time."""
    path = Path(path)
    layout, where = _index_keys(_safetensors_files(path))
    n_layers = 1 + max(layer for _, layer in where)
    values: dict[str, list[float] | None] = {}
    handles: dict[Path, object] = {}
    try:
        for signal in SIGNALS:
            layers = [where.get((signal, i)) for i in range(n_layers)]
            if any(loc is None for loc in layers):
                if signal in PROJ_SIGNALS:
                    missing = [i for i, loc in enumerate(layers) if loc is None]
                    raise ValueError(f"{path}: layers {missing[:8]} have no {signal}_proj weight")
                values[signal] = None  # absent (or only in some layers: not a per-layer profile)
                continue
            row = []
            for pieces in layers:
                summary = (0, 0.0, 0.0)
                for file, key in pieces or ():
                    if file not in handles:
                        handles[file] = safe_open(str(file), framework="pt")
                    tensor = handles[file].get_tensor(key)  # type: ignore[attr-defined]
                    _check_unquantized(tensor, file, key)
                    summary = _merge(summary, _summary(tensor))
                row.append(_std(summary))
            bad = [i for i, v in enumerate(row) if not math.isfinite(v)]
            if bad:  # a NaN/inf weight: no std, and a NaN would slip through every later test
                raise ValueError(
                    f"{path}: {signal} weights of layers {bad[:8]} hold non-finite values (NaN or inf): "
                    "their std is undefined"
                )
            values[signal] = row
    finally:
        handles.clear()
    return Profile(name or path.name or str(path), str(path), layout, n_layers, values)


# ---------------------------------------------------------------- many models


ROWS = SIGNALS + tuple(COMBINED)


def compare_profiles(a: Profile, b: Profile, settings: Settings = Settings()) -> list[SignalResult]:
    """One row per signal, then the combined rows (qkvo, qkv_bias)."""
    rows = [compare_signals(a.values, b.values, (s,), settings) for s in SIGNALS]
    rows += [compare_signals(a.values, b.values, sig, settings, label) for label, sig in COMBINED.items()]
    return rows


def _unique_names(paths: Sequence[Path]) -> list[str]:
    names = [p.resolve().name for p in paths]
    if len(set(names)) < len(names):
        names = [f"{n}-{i + 1}" for i, n in enumerate(names)]
    return names


def _cell(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def format_pair(a: Profile, b: Profile, rows: Sequence[SignalResult], settings: Settings) -> str:
    """A text table of one comparison."""
    level = f"{settings.confidence:.0%} CI"
    lines = [
        f"A = {a.name} ({a.layout}, {a.n_layers} layers)   B = {b.name} ({b.layout}, {b.n_layers} layers)",
        f"{'signal':<10} {'r':>7} {'p(perm)':>9} {level:>17} {'r(diff)':>8}  note",
    ]
    for row in rows:
        ci = f"[{row.ci[0]:+.3f}, {row.ci[1]:+.3f}]" if row.ci else "-"
        p = _cell(row.p, ".4f") + ("*" if row.p_exact else "")
        note = row.note if row.r is not None else f"undefined: {row.note}"
        lines.append(
            f"{row.signal:<10} {_cell(row.r, '+.4f'):>7} {p:>9} {ci:>17} {_cell(row.r_diff, '+.4f'):>8}  {note}"
        )
    if any(row.p_exact for row in rows):
        lines.append("* exact: every permutation of B's layers enumerated")
    return "\n".join(lines)


def plot_profiles(profiles: Sequence[Profile], path: str | Path) -> Path:
    """Every signal's z-normalised profile against relative depth, one panel per signal."""
    from matplotlib.figure import Figure  # Agg through savefig; pyplot is never imported

    signals = [s for s in SIGNALS if any(p.values.get(s) is not None for p in profiles)]
    cols = 2
    rows = math.ceil(len(signals) / cols)
    fig = Figure(figsize=(11, 2.6 * rows), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False).reshape(-1)
    for ax, signal in zip(axes, signals):
        for p in profiles:
            values = p.values.get(signal)
            if values is None:
                continue
            depth = [i / max(len(values) - 1, 1) for i in range(len(values))]
            z = z_normalise(values)
            if z is None:
                ax.plot(depth, [0.0] * len(values), ls="--", lw=1, label=f"{p.name} (flat)")
            else:
                ax.plot(depth, z, marker=".", ms=3, lw=1.2, label=p.name)
        ax.set_title(f"{signal}: per-layer std (z-normalised)", fontsize=9)
        ax.set_xlabel("relative depth", fontsize=8)
        ax.legend(fontsize=7)
    for ax in axes[len(signals) :]:
        ax.set_visible(False)
    path = Path(path)
    fig.savefig(path, dpi=110)
    return path


def fingerprint(
    paths: Sequence[str | Path], settings: Settings = Settings(), out_dir: str | Path | None = None
) -> dict:
    """Read every model, compare every pair; with out_dir write fingerprint.json/.txt/.png.

    Returns {"profiles": [...], "pairs": [{"a", "b", "rows": [...]}], "text": table}.
    """
    if len(paths) < 2:
        raise ValueError(f"fingerprint: needs at least two models, got {len(paths)}")
    names = _unique_names([Path(p) for p in paths])
    profiles = [read_profile(p, n) for p, n in zip(paths, names)]
    pairs, texts = [], []
    for a, b in itertools.combinations(profiles, 2):
        rows = compare_profiles(a, b, settings)
        pairs.append({"a": a.name, "b": b.name, "rows": [asdict(r) for r in rows]})
        texts.append(format_pair(a, b, rows, settings))
    result: dict[str, Any] = {
        "settings": asdict(settings),
        "profiles": [asdict(p) for p in profiles],
        "pairs": pairs,
        "text": "\n\n".join(texts),
        "files": {},
    }
    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        result["files"] = {
            "json": str(out / "fingerprint.json"),
            "text": str(out / "fingerprint.txt"),
            "plot": str(plot_profiles(profiles, out / "fingerprint.png")),
        }
        (out / "fingerprint.txt").write_text(result["text"] + "\n", encoding="utf-8")
        (out / "fingerprint.json").write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    return result
