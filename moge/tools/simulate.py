"""Cluster-scale Monte-Carlo of routing: per-device load, all-to-all traffic and step time.

Legend: R trials, T tokens per batch, E experts, K experts per token, M groups, N devices.

Model of the cluster (the README repeats it):
- Experts sit on devices in contiguous blocks of E/N. Tokens are the data-parallel
  batch: token t lives on device floor(t * N / T), so each device holds about T/N.
- Scores are i.i.d. logits ~ N(0, sigma) put through the config's score function, or
  expert ids replayed from a `routing_trace.safetensors` that the evaluator recorded.
- A slot (token, chosen expert) whose token and expert sit on different devices crosses
  the network twice: the dispatch sends d_model activations there, the combine sends
  the result back. bytes = slots * d_model * bytes_per_element, per leg.
- Time of one MoE layer, phases separated by the all-to-all barriers:
  dispatch, compute (routed experts on the slots a device received, plus attention and
  the shared expert on the tokens it holds), combine. Each phase lasts as long as its
  slowest device, and a device's phase of the all-to-all lasts max(sent, received) /
  bandwidth (full-duplex links); nothing overlaps. The ideal is the same work spread
  evenly, so slowdown = step / ideal >= 1 and measures imbalance alone (when N does not
  divide T the tokens themselves sit unevenly, and the ideal does not forgive that).
  FLOPs only: reading weights, latency and kernel launches are left out, so the times of
  small batches are optimistic; compare routers by the ratios.

Routers: "grouped" uses the config's M groups whatever N is (M/N groups per device stay
exactly balanced; with N/M devices per group only each group is, not each device),
"grouped_per_device" is MoGE re-grouped with M = N as the paper assumes (needs N | K),
"global" plain top-k, "group_limited" DeepSeek-V3 (config's topk_groups, else M/2).
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from matplotlib.figure import Figure
from safetensors import SafetensorError, safe_open
from torch import Tensor

from moge._validate import check_float, check_int
from moge.routing import RouterSettings, compute_scores, route
from moge.training.config import RunConfig, load_config
from moge.training.limits import available_memory, check_fits

SIM_ROUTERS = ("grouped", "global", "group_limited", "grouped_per_device")
DEFAULT_ROUTERS = ("grouped", "global", "group_limited")
_CHUNK_ROWS = 1 << 16  # tokens routed at once: bounds the [rows, E] score tensor


@dataclass
class SimResult:
    """One (router, devices, tokens) cell; per-device lists and times are trial means."""

    router: str  # a SIM_ROUTERS name, or "trace" for replayed ids
    devices: int
    tokens: int
    trials: int
    placement: str  # how the router's groups sit on the devices
    imbalance_mean: float  # IS (Eq. 3) across devices
    imbalance_max: float
    p_imbalanced: float  # fraction of trials with IS > 0
    load_max_over_mean: float  # max device slots / mean device slots
    slots_per_device: list[float]
    sent_mb_per_device: list[float]  # dispatch out + combine back, 1 MB = 1e6 bytes
    received_mb_per_device: list[float]
    a2a_max_mb: float  # the busiest device's bytes sent, per trial
    compute_ms: float
    comm_ms: float
    step_ms: float
    ideal_ms: float
    slowdown: float  # mean of per-trial step / ideal
    slowdown_max: float


# --- settings and validation ---------------------------------------------------------


def default_trials(tokens: int) -> int:
    """Fewer trials for big batches (their IS varies little): about 2^18 tokens per cell."""
    return max(4, min(200, (1 << 18) // tokens))


def _check_inputs(
    cfg: RunConfig,
    devices: int,
    tokens: int,
    router: str,
    trials: int | None,  # validated here: a bad value raises
    tflops: float,
    bandwidth_gbs: float,
    trace,
) -> None:
    E, K = cfg.moe.num_experts, cfg.moe.top_k
    if isinstance(devices, bool) or not isinstance(devices, int) or devices < 1 or E % devices:
        raise ValueError(
            f"--devices: {devices} must be a positive divisor of num_experts={E} "
            "(experts sit on devices in equal contiguous blocks)"
        )
    if isinstance(tokens, bool) or not isinstance(tokens, int) or tokens < 1:
        raise ValueError(f"--tokens: must be a positive integer, got {tokens!r}")
    if router == "trace" and trace is None:
        raise ValueError("--trace: router 'trace' replays a routing trace, but none was given")
    if router not in SIM_ROUTERS and router != "trace":
        raise ValueError(f"--routers: expected names from {', '.join(SIM_ROUTERS)}; got {router!r}")
    if router == "grouped_per_device" and K % devices:
        raise ValueError(
            f"--devices: grouped_per_device takes top_k/N experts per device, so "
            f"N={devices} must divide top_k={K}"
        )
    if isinstance(trials, bool) or not isinstance(trials, int) or trials < 1:
        raise ValueError(f"--trials: must be a positive integer, got {trials!r}")
    # ids [R, T, K] int64 kept for every trial; logits and scores [T, E] float32 per chunk
    check_fits(f"--tokens {tokens} x --trials {trials}",
               {"expert ids": trials * tokens * K * 8, "router scores": 2 * tokens * E * 4},
               "lower --tokens or --trials", available_memory())  # fmt: skip
    for name, value in (("--tflops", tflops), ("--bandwidth-gbs", bandwidth_gbs)):
        if not value > 0 or math.isinf(value):
            raise ValueError(f"{name}: must be a positive number, got {value!r}")


def router_settings(cfg: RunConfig, router: str, devices: int) -> RouterSettings:
    """The RouterSettings a simulated router uses on the config's shape."""
    m = cfg.moe
    G = m.num_experts // m.num_groups
    if router == "grouped_per_device":
        return RouterSettings("grouped", m.top_k, devices)
    if router == "group_limited":
        # DeepSeek-V3 keeps 4 of 8 groups; keep half unless the config says otherwise.
        keep = m.topk_groups or max(math.ceil(m.top_k / G), m.num_groups // 2)
        return RouterSettings("group_limited", m.top_k, m.num_groups, keep, m.group_score)
    return RouterSettings(router, m.top_k, m.num_groups)


def placement(cfg: RunConfig, router: str, devices: int) -> str:
    """Short note of how groups map to devices, shown in the table."""
    M = devices if router == "grouped_per_device" else cfg.moe.num_groups
    if router == "global":
        return "-"
    if router == "group_limited":
        return f"{router_settings(cfg, router, devices).topk_groups} of {M} groups"
    if router == "trace":
        return "recorded ids"
    if devices == M:
        return "1 group/dev"
    if M % devices == 0:
        return f"{M // devices} groups/dev"
    if devices % M == 0:
        return f"{devices // M} dev/group"
    return "groups straddle devs"


# --- where expert ids come from ------------------------------------------------------


def _random_ids(
    cfg: RunConfig, settings: RouterSettings, tokens: int, trials: int, seed: int, sigma: float
) -> Tensor:
    """Route i.i.d. N(0, sigma) logits. -> ids [R, T, K]. The same seed gives every
    router and device count the same scores (common random numbers)."""
    E = cfg.moe.num_experts
    gen = torch.Generator().manual_seed(seed)
    per_chunk = max(1, _CHUNK_ROWS // tokens)
    out = []
    for start in range(0, trials, per_chunk):
        r = min(per_chunk, trials - start)
        logits = torch.randn(r * tokens, E, generator=gen) * sigma
        _, ids = route(compute_scores(logits, cfg.moe.score_func), settings)
        out.append(ids.view(r, tokens, -1))
    return torch.cat(out)


def _trace_layers(path: str | Path, num_experts: int, top_k: int) -> Iterator[Tensor]:
    """The [T, K] expert ids of every layer of a routing trace, checked against the config.

    path: the trace file, or a run (or `moge eval --out`) folder holding routing_trace.safetensors.
    """
    path = Path(path)
    if path.is_dir():
        path = path / "routing_trace.safetensors"
    if not path.is_file():
        raise ValueError(f"--trace: file not found: {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            yield from _trace_file_layers(f, path, num_experts, top_k)
    except (SafetensorError, OSError) as err:
        raise ValueError(f"--trace: {path} is not a readable safetensors file ({str(err)[:200]})") from err


def _trace_file_layers(f, path: Path, num_experts: int, top_k: int) -> Iterator[Tensor]:
    """The checked [T, K] ids of every layer_<i> tensor of an open trace file."""
    meta = f.metadata() or {}
    for key, want in (("num_experts", num_experts), ("top_k", top_k)):
        if key in meta and meta[key].strip() != str(want):
            raise ValueError(f"--trace: {path} has {key}={meta[key]}, the config {want}")
    names = f.keys()  # noqa: SIM118 (safe_open is not iterable)
    keys = sorted((k for k in names if k.startswith("layer_") and k[6:].isdigit()), key=lambda k: int(k[6:]))
    if not keys:
        raise ValueError(f"--trace: {path} holds no layer_<i> tensors")
    for key in keys:
        ids = f.get_tensor(key)
        if ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
            raise ValueError(f"--trace: {path}:{key} holds {ids.dtype} values, not integer expert ids")
        ids = ids.long()
        if (
            ids.dim() != 2
            or ids.shape[1] != top_k
            or ids.numel()
            and (int(ids.min()) < 0 or int(ids.max()) >= num_experts)
        ):
            raise ValueError(f"--trace: {path}:{key} is not [tokens, {top_k}] ids in [0, {num_experts})")
        yield ids


def trace_ids(path: str | Path, cfg: RunConfig, tokens: int, trials: int) -> Tensor:
    """Up to `trials` batches of T consecutive recorded tokens, taken from the layers in
    turn (batch 0 of every layer, then batch 1, ...). -> ids [R, T, K]."""
    layers = list(_trace_layers(path, cfg.moe.num_experts, cfg.moe.top_k))
    most = max(ids.shape[0] for ids in layers) // tokens
    if most == 0:
        longest = max(ids.shape[0] for ids in layers)
        raise ValueError(f"--tokens: {tokens} exceeds the {longest} tokens per layer in {path}")
    batches = [
        ids[b * tokens : (b + 1) * tokens]
        for b in range(most)
        for ids in layers
        if ids.shape[0] >= (b + 1) * tokens
    ]
    return torch.stack(batches[:trials])


# --- per-device accounting and the step-time model -----------------------------------


def device_traffic(ids_RTK: Tensor, num_experts: int, devices: int) -> tuple[Tensor, Tensor, Tensor]:
    """Token-slots each device computes, and dispatch slots it sends out / takes in.

    ids_RTK [R, T, K] -> (slots_RN, out_RN, in_RN) int64. The combine returns the same
    slots the other way, so a device sends out + in slots and receives in + out.
    """
    R, T, K = ids_RTK.shape
    dev_RTK = ids_RTK // (num_experts // devices)
    src_RTK = (torch.arange(T) * devices // T).view(1, T, 1).expand(R, T, K)
    row_R11 = torch.arange(R).view(R, 1, 1) * devices
    cross_RTK = dev_RTK != src_RTK

    def count(index: Tensor) -> Tensor:
        return torch.bincount(index, minlength=R * devices).view(R, devices)

    slots_RN = count((row_R11 + dev_RTK).reshape(-1))
    out_RN = count((row_R11 + src_RTK)[cross_RTK])
    in_RN = count((row_R11 + dev_RTK)[cross_RTK])
    return slots_RN, out_RN, in_RN


def dense_flops_per_token(cfg: RunConfig) -> float:
    """Forward FLOPs of one block besides the routed experts: attention and the shared
    expert. The causal attention core is counted at the mean context seq_len / 2."""
    m = cfg.model
    q, kv = m.n_heads * m.resolved_head_dim, m.n_kv_heads * m.resolved_head_dim
    projections = 2 * m.d_model * (q + 2 * kv) + 2 * q * m.d_model
    core = 4 * q * cfg.data.seq_len / 2
    return projections + core + 6 * m.d_model * cfg.moe.shared_width


def step_times(
    cfg: RunConfig,
    slots_RN: Tensor,
    out_RN: Tensor,
    in_RN: Tensor,
    *,
    tflops: float,
    bandwidth_gbs: float,
    bytes_per_element: int,
    training: bool,
) -> dict[str, Tensor]:
    """Per-trial times [R] in ms of one MoE layer: compute, comm, step and the ideal.

    training: FLOPs x3 (forward + backward), all-to-all x2 (gradients take both legs).
    """
    R, N = slots_RN.shape
    T = int(slots_RN[0].sum()) // cfg.moe.top_k  # every trial holds T * K slots
    src_N = torch.bincount(torch.arange(int(T)) * N // T, minlength=N).double()
    flop_scale, comm_scale = (3.0, 2.0) if training else (1.0, 1.0)
    slot_flops = 6.0 * cfg.model.d_model * cfg.moe.expert_hidden
    flops_RN = (slots_RN.double() * slot_flops + src_N * dense_flops_per_token(cfg)) * flop_scale
    compute_RN = flops_RN / (tflops * 1e12) * 1e3
    slot_ms = cfg.model.d_model * bytes_per_element / (bandwidth_gbs * 1e9) * 1e3 * comm_scale
    # Dispatch and combine each move max(out, in) slots per device, full duplex.
    phase_RN = torch.maximum(out_RN, in_RN).double() * slot_ms
    compute = compute_RN.amax(dim=1)
    comm = 2 * phase_RN.amax(dim=1)
    ideal = compute_RN.mean(dim=1) + 2 * out_RN.double().mean(dim=1) * slot_ms
    return {"compute": compute, "comm": comm, "step": compute + comm, "ideal": ideal}


def _summarise(
    cfg: RunConfig,
    ids_RTK: Tensor,
    router: str,
    devices: int,
    *,
    tflops: float,
    bandwidth_gbs: float,
    bytes_per_element: int,
    training: bool,
) -> SimResult:
    R, T, _ = ids_RTK.shape
    slots_RN, out_RN, in_RN = device_traffic(ids_RTK, cfg.moe.num_experts, devices)
    times = step_times(
        cfg,
        slots_RN,
        out_RN,
        in_RN,
        tflops=tflops,
        bandwidth_gbs=bandwidth_gbs,
        bytes_per_element=bytes_per_element,
        training=training,
    )
    is_R = (slots_RN.amax(dim=1) - slots_RN.amin(dim=1)).double() / T
    mb_RN = (out_RN + in_RN).double() * cfg.model.d_model * bytes_per_element / 1e6
    ratio_R = times["step"] / times["ideal"]
    slots = slots_RN.double()
    return SimResult(
        router=router,
        devices=devices,
        tokens=T,
        trials=R,
        placement=placement(cfg, router, devices),
        imbalance_mean=float(is_R.mean()),
        imbalance_max=float(is_R.max()),
        p_imbalanced=float((is_R > 0).double().mean()),
        load_max_over_mean=float((slots.amax(dim=1) / slots.mean(dim=1)).mean()),
        slots_per_device=slots.mean(dim=0).tolist(),
        sent_mb_per_device=mb_RN.mean(dim=0).tolist(),
        received_mb_per_device=mb_RN.mean(dim=0).tolist(),  # in + out both ways: equal
        a2a_max_mb=float(mb_RN.amax(dim=1).mean()),
        compute_ms=float(times["compute"].mean()),
        comm_ms=float(times["comm"].mean()),
        step_ms=float(times["step"].mean()),
        ideal_ms=float(times["ideal"].mean()),
        slowdown=float(ratio_R.mean()),
        slowdown_max=float(ratio_R.max()),
    )


# --- the public entry points ---------------------------------------------------------


def _ids(
    cfg: RunConfig, router: str, devices: int, tokens: int, trials: int, seed: int, sigma: float, trace
) -> Tensor:
    if router == "trace":
        return trace_ids(trace, cfg, tokens, trials)
    return _random_ids(cfg, router_settings(cfg, router, devices), tokens, trials, seed, sigma)


def simulate(
    cfg: RunConfig,
    devices: int,
    tokens: int,
    router: str,
    trials: int | None = None,
    *,
    seed: int = 0,
    sigma: float = 1.0,
    tflops: float = 300.0,
    bandwidth_gbs: float = 50.0,
    bytes_per_element: int = 2,
    training: bool = False,
    trace: str | Path | None = None,
) -> SimResult:
    """Route `trials` batches of `tokens` tokens and measure them on `devices` devices.

    router "trace" replays the ids recorded in `trace` (trials may come out fewer when
    the trace is short) instead of routing random scores. trials None: default_trials.
    """
    return sweep(
        cfg,
        [devices],
        [tokens],
        [router],
        trials,
        seed=seed,
        sigma=sigma,
        tflops=tflops,
        bandwidth_gbs=bandwidth_gbs,
        bytes_per_element=bytes_per_element,
        training=training,
        trace=trace,
    )[0]


def sweep(
    cfg: RunConfig,
    devices: Sequence[int],
    tokens: Sequence[int],
    routers: Sequence[str] = DEFAULT_ROUTERS,
    trials: int | None = None,
    *,
    seed: int = 0,
    sigma: float = 1.0,
    tflops: float = 300.0,
    bandwidth_gbs: float = 50.0,
    bytes_per_element: int = 2,
    training: bool = False,
    trace: str | Path | None = None,
) -> list[SimResult]:
    """simulate() over routers x devices x tokens, in that order. A trace adds "trace"
    rows. Routed ids do not depend on the device count, so each batch is routed once."""
    names = list(routers) + (["trace"] if trace is not None and "trace" not in routers else [])
    for option, values in (("--devices", devices), ("--tokens", tokens), ("--routers", names)):
        if not values:
            raise ValueError(f"{option}: give at least one value")
    check_float("sigma", sigma, minimum=0.0, strict_min=True)
    check_int("bytes_per_element", bytes_per_element, minimum=1)
    for router in names:  # fail on any bad input before minutes of work
        for N in devices:
            for T in tokens:
                R = default_trials(T) if trials is None and isinstance(T, int) and T > 0 else trials
                _check_inputs(cfg, N, T, router, R, tflops, bandwidth_gbs, trace)
    cells: dict[tuple[str, int, int], SimResult] = {}
    for router in names:
        for T in tokens:
            R = default_trials(T) if trials is None else trials
            ids = None
            for N in devices:
                if ids is None or router == "grouped_per_device":
                    ids = _ids(cfg, router, N, T, R, seed, sigma, trace)
                cells[router, N, T] = _summarise(
                    cfg,
                    ids,
                    router,
                    N,
                    tflops=tflops,
                    bandwidth_gbs=bandwidth_gbs,
                    bytes_per_element=bytes_per_element,
                    training=training,
                )
    return [cells[r, N, T] for r in names for N in devices for T in tokens]


# --- reporting -----------------------------------------------------------------------

_COLUMNS = (
    "router",
    "N",
    "T",
    "placement",
    "trials",
    "IS mean",
    "P(IS>0)",
    "max/mean load",
    "a2a MB max/dev",
    "MoE layer ms",  # one MoE layer's forward (x3 with --training): the slowest device sets it
    "ideal ms",
    "slowdown = MoE layer time / ideal",  # the label of the plot's lower panel
)
_EVEN = (8, 9, 10)  # columns printed with one number of decimals per column (see _even)


def _row(r: SimResult) -> tuple[str | float, ...]:
    return (
        r.router,
        str(r.devices),
        str(r.tokens),
        r.placement,
        str(r.trials),
        f"{r.imbalance_mean:.4f}",
        f"{r.p_imbalanced:.2f}",
        f"{r.load_max_over_mean:.3f}",
        r.a2a_max_mb,
        r.step_ms,
        r.ideal_ms,
        f"{r.slowdown:.3f}",
    )


def _decimals(values: Sequence[float], significant: int = 3) -> int:
    """Decimals that show the smallest non-zero value with `significant` digits (0..9)."""
    smallest = min((abs(v) for v in values if v), default=1.0)
    return max(0, min(9, significant - 1 - math.floor(math.log10(smallest))))


def _even(rows: list[tuple[str | float, ...]]) -> list[tuple[str, ...]]:
    """Format the _EVEN columns with one number of decimals each, so they line up."""
    places = {i: _decimals([float(row[i]) for row in rows]) for i in _EVEN}
    return [
        tuple(f"{float(v):,.{places[i]}f}" if i in places else str(v) for i, v in enumerate(row))
        for row in rows
    ]


def _is_number(text: str) -> bool:
    return bool(text) and text.replace(",", "").replace(".", "", 1).isdigit()


def format_table(results: Sequence[SimResult]) -> str:
    """A Markdown table, one row per result, columns padded to line up in a terminal."""
    rows = [_COLUMNS, *_even([_row(r) for r in results])]
    widths = [max(len(row[i]) for row in rows) for i in range(len(_COLUMNS))]
    # Numbers right-aligned, text left-aligned.
    lines = [
        "| " + " | ".join(c.rjust(w) if _is_number(c) else c.ljust(w) for c, w in zip(row, widths)) + " |"
        for row in rows
    ]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


def plot(results: Sequence[SimResult], path: str | Path, title: str = "") -> Path:
    """simulation.png: IS (top) and slowdown vs ideal (bottom) against batch tokens,
    one line per router, one column per device count."""
    devices = sorted({r.devices for r in results})
    routers = list(dict.fromkeys(r.router for r in results))
    fig = Figure(figsize=(4.2 * len(devices), 6.5), layout="constrained")
    axes = fig.subplots(2, len(devices), squeeze=False)
    for col, N in enumerate(devices):
        for router in routers:
            cell = sorted(
                (r for r in results if r.devices == N and r.router == router), key=lambda r: r.tokens
            )
            x = [r.tokens for r in cell]
            axes[0, col].plot(x, [r.imbalance_mean for r in cell], marker="o", label=router)
            axes[1, col].plot(x, [r.slowdown for r in cell], marker="o", label=router)
        axes[0, col].set_title(f"{N} devices")
        axes[1, col].set_xlabel("tokens per batch")
        for ax in axes[:, col]:
            ax.set_xscale("log", base=2)
            ax.grid(True, alpha=0.3)
    axes[0, 0].set_ylabel("imbalance score (Eq. 3)")
    axes[1, 0].set_ylabel("MoE layer time / ideal")
    axes[0, 0].legend()
    if title:
        fig.suptitle(title)
    path = Path(path)
    fig.savefig(path, dpi=110)
    return path


def simulate_command(
    config: str,
    devices: Sequence[int],
    tokens: Sequence[int],
    routers: str | Sequence[str] = DEFAULT_ROUTERS,
    trials: int | None = None,
    tflops: float = 300.0,
    bandwidth_gbs: float = 50.0,
    trace: str | None = None,
    out: str | None = None,
    *,
    overrides: Sequence[str] = (),
    seed: int = 0,
    sigma: float = 1.0,
    training: bool = False,
) -> None:
    """`moge simulate`: sweep, print the table, write simulation.json and simulation.png
    to `out` (default runs/<config name>). `routers` may be "grouped,global"."""
    cfg = load_config(config, overrides)
    names = (
        [n.strip() for n in routers.split(",") if n.strip()] if isinstance(routers, str) else list(routers)
    )
    settings: dict[str, Any] = dict(
        seed=seed,
        sigma=sigma,
        tflops=tflops,
        bandwidth_gbs=bandwidth_gbs,
        bytes_per_element=2,
        training=training,
    )
    results = sweep(cfg, list(devices), list(tokens), names, trials, trace=trace, **settings)
    print(format_table(results))
    out_dir = Path(out or cfg.train.out_dir or f"runs/{cfg.name}")
    out_dir.mkdir(parents=True, exist_ok=True)
    report = {
        "config": str(config),
        "overrides": list(overrides),
        "trace": trace,
        **settings,
        "results": [dataclasses.asdict(r) for r in results],
    }
    (out_dir / "simulation.json").write_text(json.dumps(report, indent=1), encoding="utf-8")
    M = cfg.moe.num_groups
    plot(
        results,
        out_dir / "simulation.png",
        f"{cfg.name}: {cfg.moe.num_experts} experts, top-{cfg.moe.top_k}, grouped = the config's {M} groups",
    )
    print(f"wrote {out_dir / 'simulation.json'} and {out_dir / 'simulation.png'}")
