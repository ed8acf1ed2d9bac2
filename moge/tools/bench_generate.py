"""Decoding benchmark: `moge generate` (MoGETransformer.generate with its KV cache) against
transformers' `generate` on the same weights.

Legend: B batch, L prompt length, N new tokens.

The moge model is the config's shape written so that the Qwen3-MoE layout can hold it
(`qwen3_shape`: global top-k router, no shared expert, no learned expert scale, q/k
norms). It is saved with moge.interop.save_pretrained(layout="qwen3_moe") and read back
by transformers' Qwen3MoeForCausalLM, so both decode the same weights: greedy, the same
prompt, the same number of new tokens, prefill included. Batch sizes, and the two
implementations within a batch size, run round-robin in a rotated order, so a slow phase
of the shared machine hits all of them. Reported: median new tokens/s [IQR], the ratio,
and whether the two produced the same tokens. A third row per batch size decodes the
config as written (the MoGE router, shared expert), which no transformers class holds.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import statistics
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from moge._argtypes import integer
from moge.model import MoGETransformer
from moge.tools.bench import cli_start, machine_info
from moge.tools.bench_report import machine_line
from moge.training.config import RunConfig, load_config

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def qwen3_shape(cfg: RunConfig) -> RunConfig:
    """cfg with what Qwen3-MoE cannot express replaced: the global top-k router (same
    experts and top_k), no shared expert, no learned expert scale, q/k norms, and an
    o_proj bias exactly when q/k/v have one (Qwen3's single attention_bias flag)."""
    m = dataclasses.replace(cfg.model, qk_norm=True, o_bias=cfg.model.qkv_bias)
    e = dataclasses.replace(
        cfg.moe, router="global", num_shared_experts=0, shared_hidden=None, shared_expert_gate=False,
        learned_expert_scale=False, bias_update_rate=0.0, score_func="softmax", route_scale=1.0,
    )  # fmt: skip
    return dataclasses.replace(cfg, model=m, moe=e)


def moge_greedy(model: MoGETransformer, prompt_BL: Tensor, new_tokens: int) -> Tensor:
    """What `moge generate --temperature 0` runs: prompt [B, L] -> [B, L + N]."""
    return model.generate(prompt_BL, new_tokens, temperature=0.0)


def hf_greedy(model: nn.Module, prompt_BL: Tensor, new_tokens: int) -> Tensor:
    """transformers' greedy generate with its KV cache: prompt [B, L] -> [B, L + N].

    The attention mask is passed (all ones), so no prompt token is taken for padding."""
    with torch.no_grad():
        return model.generate(  # type: ignore[operator]
            input_ids=prompt_BL, attention_mask=torch.ones_like(prompt_BL), max_new_tokens=new_tokens,
            do_sample=False, pad_token_id=0, eos_token_id=None,
        )  # fmt: skip


def load_hf_twin(model: MoGETransformer, dtype: torch.dtype) -> nn.Module:
    """transformers' Qwen3MoeForCausalLM holding `model`'s weights, through a qwen3_moe folder."""
    from transformers import Qwen3MoeForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # its "Loading weights" bar would land in the report
    with tempfile.TemporaryDirectory() as folder, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.save_pretrained(folder, layout="qwen3_moe")
        hf = Qwen3MoeForCausalLM.from_pretrained(folder, dtype=dtype)
    hf.generation_config.eos_token_id = None  # never stop early: exactly N new tokens
    return hf.eval()


@dataclass
class DecodeCase:
    """One implementation at one batch size; decode(prompt) -> tokens [B, L + N]."""

    name: str
    batch: int
    decode: Callable[[Tensor], Tensor]
    seconds: list[float] = field(default_factory=list)
    tokens: Tensor | None = None

    def run(self, prompt_BL: Tensor, record: bool) -> None:
        start = time.perf_counter()
        out = self.decode(prompt_BL)
        if record:
            self.seconds.append(time.perf_counter() - start)
        self.tokens = out


def _prompt(vocab: int, batch: int, length: int, seed: int) -> Tensor:
    return torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


def _build_models(cfg: RunConfig, seed: int, dtype: torch.dtype, peers: bool):
    """(moge in Qwen3-MoE's shape, its transformers twin or None, moge as written)."""
    twin_cfg = qwen3_shape(cfg)
    torch.manual_seed(seed)
    twin = MoGETransformer(twin_cfg.model, twin_cfg.moe).eval()
    hf = load_hf_twin(twin, dtype) if peers else None
    torch.manual_seed(seed)
    written = MoGETransformer(cfg.model, cfg.moe).eval().to(dtype)
    return twin.to(dtype), hf, written


def run_generate_benchmark(
    cfg: RunConfig,
    batches: tuple[int, ...] = (1, 16),
    prompt_len: int = 32,
    new_tokens: int = 64,
    rounds: int = 5,
    warmup: int = 1,
    seed: int = 0,
    dtype: str = "fp32",
    peers: bool = True,
    log: Callable[[str], None] = print,
) -> dict:
    """Time greedy decoding of every case `rounds` times after `warmup` untimed rounds."""
    if rounds < 1 or warmup < 0 or new_tokens < 1 or prompt_len < 1 or not batches or min(batches) < 1:
        raise ValueError(
            f"rounds, new_tokens, prompt_len and every batch must be >= 1 and warmup >= 0; got rounds={rounds}, "
            f"warmup={warmup}, new_tokens={new_tokens}, prompt_len={prompt_len}, batches={batches}"
        )
    if dtype not in DTYPES:
        raise ValueError(f"dtype: expected one of {', '.join(DTYPES)}, got {dtype!r}")
    if prompt_len + new_tokens > cfg.model.max_seq_len:
        raise ValueError(
            f"prompt_len + new_tokens: {prompt_len} + {new_tokens} exceed model.max_seq_len={cfg.model.max_seq_len}"
        )
    machine = machine_info()
    notes: list[str] = []
    if peers:
        try:
            import transformers  # noqa: F401
        except ImportError:
            notes.append("transformers peer skipped: not installed (pip install 'moge[bench]')")
            peers = False
    twin, hf, written = _build_models(cfg, seed, DTYPES[dtype], peers)
    prompts = {b: _prompt(cfg.model.vocab_size, b, prompt_len, seed + b) for b in batches}
    impls: list[tuple[str, Callable[[Tensor], Tensor]]] = [
        ("moge generate (Qwen3-MoE shape)", functools.partial(moge_greedy, twin, new_tokens=new_tokens))
    ]
    if hf is not None:
        impls.append(
            ("transformers Qwen3-MoE generate", functools.partial(hf_greedy, hf, new_tokens=new_tokens))
        )
    impls.append(
        ("moge generate (config as written)", functools.partial(moge_greedy, written, new_tokens=new_tokens))
    )
    cases = [DecodeCase(name, b, decode) for b in batches for name, decode in impls]
    for i in range(warmup + rounds):
        k = i % len(cases)
        for case in cases[k:] + cases[:k]:
            case.run(prompts[case.batch], record=i >= warmup)
        log(f"  round {i + 1}/{warmup + rounds} done")
    return {
        "machine": machine,
        "dtype": dtype,
        "prompt_len": prompt_len,
        "new_tokens": new_tokens,
        "rounds": rounds,
        "warmup": warmup,
        "rows": [_row(c, new_tokens) for c in cases],
        "same_tokens": {b: _same(cases, b) for b in batches} if hf is not None else {},
        "notes": notes,
        "load_average_end": machine_info()["load_average"],
    }


def _same(cases: list[DecodeCase], batch: int) -> bool:
    mine, theirs = (c.tokens for c in cases if c.batch == batch and "Qwen3-MoE" in c.name)
    return mine is not None and theirs is not None and torch.equal(mine, theirs)


def _row(case: DecodeCase, new_tokens: int) -> dict:
    s = case.seconds
    # "inclusive", as the layer benchmark: the quartiles stay within the rounds measured.
    q = statistics.quantiles(s, n=4, method="inclusive") if len(s) > 1 else [s[0]] * 3
    per = case.batch * new_tokens
    return {
        "name": case.name, "batch": case.batch, "median_s": q[1], "q1_s": q[0], "q3_s": q[2], "best_s": min(s),
        "tokens_per_s": per / q[1], "tokens_per_s_q1": per / q[2], "tokens_per_s_q3": per / q[0],
    }  # fmt: skip


def format_generate_report(report: dict, title: str) -> str:
    m = report["machine"]
    lines = [
        f"decoding benchmark: {title}, {report['dtype']}, greedy, prompt {report['prompt_len']} tokens + "
        f"{report['new_tokens']} new tokens (prefill included), {report['rounds']} timed rounds after "
        f"{report['warmup']} warm-up, round-robin",
        machine_line(m),
        f"load average (1, 5, 15 min) at start: {m['load_average']}, at end: {report.get('load_average_end')}",
        "x transformers: ratio of the median rounds, and [of each one's fastest round, the least disturbed]",
        f"{'batch':>5}  {'implementation':40} {'new tokens/s [IQR]':>24} {'ms/token':>9} {'x transformers':>15}",
    ]
    rows = report["rows"]
    for r in rows:
        peer = next(
            (p for p in rows if p["batch"] == r["batch"] and p["name"].startswith("transformers")), None
        )
        ratio = "-"
        if peer is not None:
            ratio = f"{r['tokens_per_s'] / peer['tokens_per_s']:.2f} [{peer['best_s'] / r['best_s']:.2f}]"
        rate = f"{r['tokens_per_s']:.0f} [{r['tokens_per_s_q1']:.0f}-{r['tokens_per_s_q3']:.0f}]"
        per_token = 1e3 * r["median_s"] / report["new_tokens"]
        lines.append(f"{r['batch']:>5}  {r['name']:40} {rate:>24} {per_token:>9.2f} {ratio:>15}")
    for b, same in report["same_tokens"].items():
        verdict = "the same" if same else "DIFFERENT"
        lines.append(f"batch {b}: moge and transformers produced {verdict} greedy tokens")
    lines += report["notes"]
    return "\n".join(lines)


def build_parser(prog: str = "bench_generate.py") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=prog,
        description="Decoding tokens/s: moge generate vs transformers generate, same weights (CPU).",
    )
    p.add_argument(
        "config",
        nargs="?",
        default="tiny-moge",
        help="YAML run config: a path or a preset name (default: tiny-moge)",
    )
    p.add_argument("--batch", default="1,16", help="comma-separated batch sizes")
    p.add_argument("--prompt-len", type=integer, default=32, dest="prompt_len")
    p.add_argument("--tokens", type=integer, default=64, help="new tokens per sequence")
    p.add_argument("--rounds", type=integer, default=5, help="timed rounds")
    p.add_argument("--warmup", type=integer, default=1)
    p.add_argument("--threads", type=integer, default=None, help="torch threads (default: torch's)")
    p.add_argument("--dtype", default="fp32", help="comma-separated: fp32, bf16 (the weights' dtype)")
    p.add_argument("--no-peers", action="store_true", help="moge rows only")
    p.add_argument("--seed", type=integer, default=0)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override")
    p.add_argument("--quiet", action="store_true")
    return p


def main(argv: list[str] | None = None, prog: str = "bench_generate.py") -> int:
    import sys

    args = build_parser(prog).parse_args(argv)
    try:
        log = cli_start(args.threads, args.quiet)
        cfg = load_config(args.config, args.set)
        batches = tuple(int(b) for b in args.batch.split(",") if b.strip())
        for dtype in (d.strip() for d in args.dtype.split(",") if d.strip()):
            report = run_generate_benchmark(
                cfg, batches, args.prompt_len, args.tokens, args.rounds, args.warmup, args.seed, dtype,
                not args.no_peers, log,
            )  # fmt: skip
            print(format_generate_report(report, args.config), flush=True)
            print()
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0
