"""Training benchmark: tokens/s of a moge model against a transformers Qwen3-MoE model
of the same shape, same data, same steps, same optimiser.

Legend: B batch, L sequence length, V vocabulary.

The models: moge as the config writes it; moge without its shared expert (Qwen3-MoE
has none, so this is the same shape and, up to Qwen3's q/k norms and moge's per-expert
scales, the same parameter count); and the transformers Qwen3-MoE causal LM with its
"eager" and "grouped_mm" expert code. Qwen3-MoE routes globally (softmax, top-k); moge
routes by group. Every model starts from its own init (same std) and takes the same
batches, the trainer's AdamW groups, learning-rate schedule and gradient clipping;
one round runs one optimiser step of every model, in a rotated order, so
slow phases of the shared machine hit all of them. Reported: median step time and its
inter-quartile range, tokens/s from the median, parameters, and both losses (the
cross-entropy and the auxiliary balance term) at the first and the last steps.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F_
from einops import rearrange
from torch import Tensor, nn

from moge._argtypes import integer
from moge.model import MoGETransformer
from moge.model.compiled import compile_model
from moge.tools.bench import cli_start, machine_info
from moge.tools.bench_isolated import RemoteCase
from moge.tools.bench_report import machine_line
from moge.tools.dense_cost import with_dense_cost_experts
from moge.tools.step_profile import format_profiles, merge_profiles, profile_steps, step_scope
from moge.training import build_optimizer, lr_at
from moge.training.config import RunConfig, config_from_dict, config_to_dict, load_config
from moge.training.data import load_dataset


@dataclass
class TrainCase:
    """One model under training. step(x, y) -> (lm loss, aux term), both detached floats."""

    name: str
    model: nn.Module
    optimizer: torch.optim.Optimizer
    loss_fn: Callable[[Tensor, Tensor], tuple[Tensor, Tensor]]
    after_step: Callable[[], None] = lambda: None  # once per optimiser step, after AdamW
    autocast: torch.dtype | None = None  # the forward under CPU autocast to this dtype
    step_ms: list[float] = field(default_factory=list)
    lm_losses: list[float] = field(default_factory=list)
    aux_losses: list[float] = field(default_factory=list)

    @property
    def params(self) -> int:
        return sum(p.numel() for p in self.model.parameters())

    def step(self, x_BL: Tensor, y_BL: Tensor, lr: float, grad_clip: float, record: bool) -> None:
        """One optimiser step as the trainer takes it: loss, backward, clip, AdamW.

        The step's own parts run in moge.tools.step_profile scopes (free unless profiled)."""
        start = time.perf_counter()
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        with torch.autocast("cpu", dtype=self.autocast or torch.bfloat16, enabled=self.autocast is not None):
            lm, aux = self.loss_fn(x_BL, y_BL)
        (lm + aux).backward()
        if grad_clip > 0:
            with step_scope("clip"):
                _clip(self.model, grad_clip)
        with step_scope("optimizer (AdamW)"):
            self.optimizer.step()
        with step_scope("zero_grad"):
            self.optimizer.zero_grad(set_to_none=True)
        with step_scope("end_step"):
            self.after_step()
        elapsed = time.perf_counter() - start
        if record:
            self.step_ms.append(1e3 * elapsed)
        self.lm_losses.append(lm.item())
        self.aux_losses.append(aux.item())

    def set_autocast(self, dtype: torch.dtype | None) -> None:
        self.autocast = dtype

    def compile_model(self, shape: tuple[int, int]) -> str | None:
        """train.compile on a moge model: None, or why torch.compile failed (then eager)."""
        assert isinstance(self.model, MoGETransformer), "only moge models compile (train.compile)"
        return compile_model(self.model, shape, self.autocast)

    def profile_step(self, x_BL: Tensor, y_BL: Tensor, lr: float, grad_clip: float) -> dict:
        """One more step (unrecorded) under the profiler (moge.tools.step_profile)."""
        return profile_steps(self.model, lambda: self.step(x_BL, y_BL, lr, grad_clip, record=False), 1)

    def summary(self) -> dict:
        return {
            "name": self.name, "params": self.params, "step_ms": list(self.step_ms),
            "lm_losses": list(self.lm_losses), "aux_losses": list(self.aux_losses),
            "pid": os.getpid(),  # the process it trained in
        }  # fmt: skip


def _clip(model: nn.Module, max_norm: float) -> None:
    """torch's clip by the global norm, without its scaling pass where it would scale by 1
    (as moge.training.loop does)."""
    params = [p for p in model.parameters() if p.grad is not None]
    norm = nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
    if bool(max_norm / (norm + 1e-6) < 1.0):
        nn.utils.clip_grads_with_norm_(params, max_norm, norm)


def moge_case(cfg: RunConfig, name: str, seed: int) -> TrainCase:
    torch.manual_seed(seed)
    model = MoGETransformer(cfg.model, cfg.moe)

    def loss_fn(x_BL: Tensor, y_BL: Tensor):
        out = model(x_BL, y_BL)
        return out.lm_loss, out.aux_loss

    def after_step() -> None:
        for layer in model.moe_layers():
            layer.end_step()  # as the trainer does: bias update, load counts reset

    return TrainCase(name, model, build_optimizer(model, cfg.train), loss_fn, after_step=after_step)


DENSE_NAME = "dense FFN of equal activated width (the model-level limit)"
BOUND_NAME = "moge, routed experts at a dense FFN's cost (the bound)"


def bound_case(cfg: RunConfig, name: str, seed: int) -> TrainCase:
    """moge as configured with every routed-experts module doing a dense SwiGLU's work of
    their activated width (moge.tools.dense_cost): what a perfect grouped kernel would
    give, with the router, shared experts and optimiser as in moge. A timing bound only."""
    case = moge_case(cfg, name, seed)
    with_dense_cost_experts(case.model, cfg.model.init_std)
    case.optimizer = build_optimizer(case.model, cfg.train)
    return case


def dense_equivalent(cfg: RunConfig) -> RunConfig:
    """cfg with every block's FFN a dense SwiGLU of the width a token activates in a
    MoE block: top_k * expert_hidden plus the shared experts' width."""
    width = cfg.moe.top_k * cfg.moe.expert_hidden + cfg.moe.shared_width
    m = cfg.model
    dense = [i for i in range(m.n_layers) if not m.is_moe_layer(i)]
    if dense and m.resolved_dense_hidden != width:
        # The twin has one dense width for every block: it would resize these blocks too.
        raise ValueError(
            f"model.first_dense_layers/moe_every: blocks {dense} are dense of width {m.resolved_dense_hidden}, "
            f"and the dense twin (one width for every block) would make them {width}; benchmark an all-MoE "
            "config, or one whose model.dense_hidden is the activated width"
        )
    model = dataclasses.replace(m, first_dense_layers=m.n_layers, dense_hidden=width)
    return dataclasses.replace(cfg, model=model)


def qwen3_config(cfg: RunConfig):
    """The transformers Qwen3MoeConfig with the moge config's shape (every block MoE)."""
    from transformers import Qwen3MoeConfig

    m, e = cfg.model, cfg.moe
    qcfg = Qwen3MoeConfig(
        vocab_size=m.vocab_size, hidden_size=m.d_model, intermediate_size=m.resolved_dense_hidden,
        num_hidden_layers=m.n_layers, num_attention_heads=m.n_heads, num_key_value_heads=m.n_kv_heads,
        head_dim=m.resolved_head_dim,  # type: ignore[call-arg]  # an accepted extra kwarg the signature omits
        max_position_embeddings=m.max_seq_len, rms_norm_eps=m.norm_eps,
        rope_parameters={"rope_type": "default", "rope_theta": m.rope_theta}, tie_word_embeddings=m.tie_embeddings,
        initializer_range=m.init_std, attention_bias=m.qkv_bias, decoder_sparse_step=1, mlp_only_layers=[],
        moe_intermediate_size=e.expert_hidden, num_experts=e.num_experts, num_experts_per_tok=e.top_k,
        norm_topk_prob=e.normalize_weights, output_router_logits=True, router_aux_loss_coef=e.aux_loss_coef,
        use_cache=False,
    )  # fmt: skip
    qcfg._attn_implementation = "sdpa"  # moge's attention is F.scaled_dot_product_attention too
    return qcfg


def qwen3_case(cfg: RunConfig, impl: str, seed: int) -> TrainCase:
    from transformers import Qwen3MoeForCausalLM

    qcfg = qwen3_config(cfg)
    qcfg._experts_implementation = impl
    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = Qwen3MoeForCausalLM(qcfg)
    coef = cfg.moe.aux_loss_coef

    def loss_fn(x_BL: Tensor, y_BL: Tensor):
        # Our batches are already shifted (y = x moved by one), so the loss is taken
        # here rather than through `labels`, which would shift once more.
        out = model(input_ids=x_BL)
        lm = F_.cross_entropy(
            rearrange(out.logits.float(), "b l v -> (b l) v"), rearrange(y_BL, "b l -> (b l)")
        )
        return lm, coef * out.aux_loss

    return TrainCase(f"transformers Qwen3-MoE ({impl})", model, build_optimizer(model, cfg.train), loss_fn)


def train_case_specs(
    cfg: RunConfig, seed: int, peers: bool, bound: bool = False
) -> tuple[list[dict], list[str]]:
    """Every case as JSON data for build_case: moge as configured, the dense twin, (bound)
    moge with its routed experts at a dense FFN's cost, moge in Qwen3-MoE's shape, and (if
    installed) the Qwen3-MoE peers; and notes on what was left out."""

    def spec(kind: str, c: RunConfig, arg: str) -> dict:
        return {"kind": kind, "config": config_to_dict(c), "arg": arg, "seed": seed}

    specs = [spec("moge", cfg, "moge MoGETransformer (config as written)")]
    specs.append(spec("moge", dense_equivalent(cfg), DENSE_NAME))
    if bound:
        specs.append(spec("bound", cfg, BOUND_NAME))
    notes: list[str] = []
    if cfg.moe.num_shared_experts:
        # With the shared experts go the fields that size and gate them (else MoGEConfig refuses).
        moe = dataclasses.replace(cfg.moe, num_shared_experts=0, shared_hidden=None, shared_expert_gate=False)
        bare = dataclasses.replace(cfg, moe=moe)
        specs.append(spec("moge", bare, "moge MoGETransformer (no shared expert: Qwen3-MoE's shape)"))
    if not peers:
        return specs, notes
    try:
        import transformers
    except ImportError:
        notes.append("transformers peers skipped: transformers is not installed (pip install 'moge[bench]')")
        return specs, notes
    if int(transformers.__version__.split(".")[0]) < 5:
        notes.append(f"transformers peers skipped: transformers {transformers.__version__} < 5")
        return specs, notes
    specs += [spec("qwen3", cfg, impl) for impl in ("eager", "grouped_mm")]
    return specs, notes


def build_case(spec: dict) -> TrainCase:
    """The case a train_case_specs entry describes (here, or in a benchmark worker)."""
    cfg = config_from_dict(spec["config"])
    if spec["kind"] == "moge":
        return moge_case(cfg, spec["arg"], spec["seed"])
    if spec["kind"] == "bound":
        return bound_case(cfg, spec["arg"], spec["seed"])
    assert spec["kind"] == "qwen3", f"unknown case kind {spec['kind']!r}"
    return qwen3_case(cfg, spec["arg"], spec["seed"])


def build_train_cases(
    cfg: RunConfig, seed: int, peers: bool, bound: bool = False
) -> tuple[list[TrainCase], list[str]]:
    """The cases of train_case_specs, built in this process."""
    specs, notes = train_case_specs(cfg, seed, peers, bound)
    return [build_case(s) for s in specs], notes


def _is_peer(name: str) -> bool:
    return name.startswith("transformers")


# After its step a process with 2+ torch threads (a child, or this driver after drawing a
# batch) keeps OpenMP's helper threads spinning for the next parallel region: ~7 ms of a
# core on this machine (the process's CPU time during a sleep after one parallel op, AMD
# EPYC, 2 threads), on cores the next child's step needs. A pause before each turn lets them
# go idle first, so every step runs as it would in a process training alone: both models'
# steps ~5% faster in an A/B at 2 threads (docs/performance.md, ninth session).
SETTLE_S = 0.02


def settle_seconds(isolate: bool, threads: int) -> float:
    """The pause before each turn: SETTLE_S between processes of 2+ threads, else 0
    (one process shares one OpenMP team; one-thread processes have no helpers)."""
    return SETTLE_S if isolate and threads > 1 else 0.0


def run_train_benchmark(
    cfg: RunConfig,
    steps: int,
    warmup: int,
    seed: int = 0,
    peers: bool = True,
    log: Callable[[str], None] = print,
    dtype: str = "fp32",
    profile: int = 0,
    compile: bool = False,
    isolate: bool = True,
    bound: bool = False,
) -> dict:
    """Train every case for warmup + steps optimiser steps on the same batches; dtype
    "bf16" runs every forward under bf16 autocast (float32 weights and AdamW). profile > 0:
    then profile that many more steps of every moge model (moge.tools.step_profile).
    compile: every moge model's attention halves through torch.compile first (train.compile;
    the dense twin's too, the transformers peers stay eager). isolate: every case in a
    process of its own, still one step of each in turn (moge.tools.bench_isolated: one
    process's oneDNN kernel cache cannot hold every model's shapes); False: all in this one.
    bound: also moge with its routed experts at a dense FFN's cost (bound_case)."""
    if steps < 1 or warmup < 0 or profile < 0:
        raise ValueError(
            f"steps: must be >= 1 (got {steps}), warmup and profile >= 0 (got {warmup}, {profile})"
        )
    if dtype not in ("fp32", "bf16"):
        raise ValueError(f"dtype: expected fp32 or bf16, got {dtype!r}")
    machine = machine_info()
    dataset = load_dataset(cfg.data)
    dataset.check_vocab_size(cfg.model.vocab_size)
    specs, notes = train_case_specs(cfg, seed, peers, bound)
    cases: list = []
    try:
        if isolate:
            cases = [RemoteCase("moge.tools.bench_train:build_case", spec) for spec in specs]
            for case in cases:
                case.wait_ready()
        else:
            cases = [build_case(spec) for spec in specs]
        return _run_cases(
            cases,
            [case.name for case in cases],
            cfg,
            dataset,
            steps,
            warmup,
            seed,
            log,
            dtype,
            profile,
            compile,
            machine,
            notes,
            isolate,
        )
    finally:
        for case in cases:
            if isinstance(case, RemoteCase):
                case.close()


def _run_cases(
    cases: list, names: list[str], cfg: RunConfig, dataset, steps: int, warmup: int, seed: int,
    log: Callable[[str], None], dtype: str, profile: int, compile: bool, machine: dict, notes: list[str],
    isolate: bool,
) -> dict:  # fmt: skip
    """run_train_benchmark's rounds on built cases (local TrainCases or RemoteCases)."""
    for case in cases:
        case.set_autocast(torch.bfloat16 if dtype == "bf16" else None)
    tc = cfg.train
    for case, name in zip(cases, names):
        if compile and not _is_peer(name):
            log(f"  compiling {name}")
            reason = case.compile_model((tc.batch_size, cfg.data.seq_len))
            notes.append(
                f"{name}: "
                + (
                    f"torch.compile failed ({reason}), eager"
                    if reason
                    else "attention and FFN elementwise compiled"
                )
            )
    gen = torch.Generator().manual_seed(seed)
    settle = settle_seconds(isolate, torch.get_num_threads())
    for i in range(warmup + steps):
        x_BL, y_BL = dataset.get_batch("train", tc.batch_size, gen)
        k = i % len(cases)
        for case in cases[k:] + cases[:k]:
            if settle:
                time.sleep(settle)
            case.step(x_BL, y_BL, lr_at(i, tc), tc.grad_clip, record=i >= warmup)
        if (i + 1) % 5 == 0:
            log(f"  step {i + 1}/{warmup + steps} done")
    tokens = tc.batch_size * cfg.data.seq_len
    rows = [_row(case.summary(), tokens) for case in cases]
    load_end = machine_info()["load_average"]
    mine = [(c, n) for c, n in zip(cases, names) if not _is_peer(n)]
    runs: dict[str, list[dict]] = {n: [] for _, n in mine}
    for i in range(profile):  # round-robin too: one profiled step of each model per round
        x_BL, y_BL = dataset.get_batch("train", tc.batch_size, gen)
        k = i % len(mine)
        for case, name in mine[k:] + mine[:k]:
            if settle:
                time.sleep(settle)
            runs[name].append(case.profile_step(x_BL, y_BL, tc.min_lr, tc.grad_clip))
    profiles = {name: merge_profiles(p) for name, p in runs.items() if p}
    return {
        "machine": machine,
        "load_average_end": load_end,
        "dtype": dtype,
        "tokens_per_step": tokens,
        "steps": steps,
        "warmup": warmup,
        "rows": rows,
        "notes": notes,
        "profiles": profiles,
        "isolated": isolate,
        "settle_s": settle,
    }


def _row(summary: dict, tokens: int) -> dict:
    """A case's table row from its TrainCase.summary()."""
    ms, lm, aux = summary["step_ms"], summary["lm_losses"], summary["aux_losses"]
    # "inclusive", as the layer benchmark: the quartiles stay within the steps measured.
    q = statistics.quantiles(ms, n=4, method="inclusive") if len(ms) > 1 else [ms[0]] * 3
    last = min(5, len(lm))
    return {
        "name": summary["name"], "params": summary["params"], "median_ms": q[1], "q1_ms": q[0], "q3_ms": q[2],
        "best_ms": min(ms), "tokens_per_s": tokens / (q[1] / 1e3), "lm_loss_first": lm[0], "aux_first": aux[0],
        "lm_loss_last": statistics.fmean(lm[-last:]), "aux_last": statistics.fmean(aux[-last:]),
        "pid": summary["pid"],
    }  # fmt: skip


def _ratio(base: dict, row: dict) -> str:
    """row's tokens/s over base's: of the medians, then (bracketed) of the fastest steps."""
    best = f" [{base['best_ms'] / row['best_ms']:.2f}x]" if "best_ms" in row and "best_ms" in base else ""
    return f"{base['median_ms'] / row['median_ms']:.2f}x{best}"


def format_train_report(report: dict, title: str) -> str:
    m = report["machine"]
    lines = [
        f"training benchmark: {title}, {report.get('dtype', 'fp32')}, {report['tokens_per_step']} tokens per step, "
        f"{report['steps']} timed steps after {report['warmup']} warmup",
        machine_line(m),
        f"load average (1, 5, 15 min) at start: {m.get('load_average')}, at end: {report.get('load_average_end')}",
        "every model in a process of its own, one step of each in turn (own oneDNN kernel cache, as when it "
        "trains alone)"
        + (f", {1e3 * settle:.0f} ms pause before each turn" if (settle := report.get("settle_s")) else "")
        if report.get("isolated")
        else "every model in this one process, one step of each in turn (they share oneDNN's kernel cache)",
        "ratios: of medians, and (in brackets) of each model's fastest step, the least disturbed by other load",
        f"{'model':58} {'params':>11} {'step ms [IQR]':>20} {'best':>6} {'tokens/s':>9} {'lm loss first->last':>20} "
        f"{'aux last':>9}",
    ]
    fastest_peer = None
    for r in report["rows"]:
        step = f"{r['median_ms']:.0f} [{r['q1_ms']:.0f}-{r['q3_ms']:.0f}]"
        loss = f"{r['lm_loss_first']:.3f} -> {r['lm_loss_last']:.3f}"
        lines.append(
            f"{r['name']:58} {r['params']:>11,} {step:>20} {r['best_ms']:>6.0f} {r['tokens_per_s']:>9.0f} {loss:>20} "
            f"{r['aux_last']:>9.5f}"
        )
        if r["name"].startswith("transformers") and (
            fastest_peer is None or r["median_ms"] < fastest_peer["median_ms"]
        ):
            fastest_peer = r
    lines += report["notes"]
    dense = next((r for r in report["rows"] if r["name"] == DENSE_NAME), None)
    if dense is not None:
        for r in report["rows"]:
            if r["name"].startswith("moge"):
                lines.append(f"{r['name']}: {_ratio(dense, r)} the tokens/s of the {DENSE_NAME}")
    if fastest_peer is not None:
        for r in report["rows"]:
            if r["name"].startswith("moge"):
                lines.append(f"{r['name']}: {_ratio(fastest_peer, r)} the tokens/s of {fastest_peer['name']}")
    if report.get("profiles"):
        lines += ["", "where the time goes (torch.profiler, self time by op group; moge.tools.step_profile):"]
        lines.append(format_profiles(report["profiles"]))
    return "\n".join(lines)


def build_parser(prog: str = "bench_train.py") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=prog, description="Training tokens/s: moge vs transformers Qwen3-MoE (CPU)."
    )
    p.add_argument(
        "configs",
        nargs="*",
        default=["tiny-moge", "small-moge"],
        help="YAML run configs: paths or preset names (default: tiny-moge small-moge)",
    )
    p.add_argument("--steps", type=integer, default=20, help="timed optimiser steps per model")
    p.add_argument("--warmup", type=integer, default=2)
    p.add_argument("--threads", type=integer, default=None, help="torch threads (default: torch's)")
    p.add_argument("--dtype", default="fp32", help="comma-separated: fp32, bf16 (bf16 autocast)")
    p.add_argument("--no-peers", action="store_true", help="moge models only")
    p.add_argument(
        "--bound", action="store_true",
        help="also moge with its routed experts replaced by a dense SwiGLU of their activated width (what a "
        "perfect grouped kernel would cost; a timing bound, not the MoE's maths; under --profile its dense SwiGLU "
        "shows as dense FFN, its zero gradients as routed experts)",
    )  # fmt: skip
    p.add_argument(
        "--compile", action="store_true",
        help="moge models (and the dense twin) with their attention halves and FFN elementwise work through "
        "torch.compile (train.compile)",
    )  # fmt: skip
    p.add_argument(
        "--profile", type=integer, default=0, metavar="N",
        help="then profile N more steps of every moge model: time by op group, forward and backward",
    )  # fmt: skip
    p.add_argument(
        "--one-process", action="store_true",
        help="every model in this process (by default each runs in its own, with its own oneDNN kernel cache)",
    )  # fmt: skip
    p.add_argument("--seed", type=integer, default=0)
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="config override, e.g. train.batch_size=8",
    )
    p.add_argument("--quiet", action="store_true")
    return p


def main(argv: list[str] | None = None, prog: str = "bench_train.py") -> int:
    import sys

    args = build_parser(prog).parse_args(argv)
    try:
        log = cli_start(args.threads, args.quiet)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    for path in args.configs:
        try:
            cfg = load_config(path, args.set)
            for dtype in (d.strip() for d in args.dtype.split(",") if d.strip()):
                log(f"{path} ({dtype}):")
                report = run_train_benchmark(
                    cfg,
                    args.steps,
                    args.warmup,
                    args.seed,
                    not args.no_peers,
                    log,
                    dtype,
                    args.profile,
                    args.compile,
                    isolate=not args.one_process,
                    bound=args.bound,
                )
                print(format_train_report(report, path), flush=True)
                print()
        except (ValueError, FileNotFoundError) as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
    return 0
