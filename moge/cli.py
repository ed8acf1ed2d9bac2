"""`moge` command line: a thin argparse layer over the library.

    moge train CONFIG [KEY=VALUE ...]        train (e.g. train.steps=50 moe.router=global)
    moge params CONFIG [KEY=VALUE ...]       total and activated parameters (meta device)
    moge eval RUN_DIR [RUN_DIR ...]          report / comparison (moge.tools.evaluate)
    moge generate RUN_DIR --prompt TEXT [--prompt TEXT ...]   sample bytes from a trained run
    moge simulate CONFIG --devices N --tokens T   routing on a cluster: balance, all-to-all, step time
    moge plan CONFIG --devices N [N ...] [--mesh ep=E]   per-device memory of training on N devices
    moge bench [OPTIONS]                     time the layer against the dense limit (moge.tools.bench)
    moge torchrun [TORCHRUN OPTIONS] SUBCOMMAND ...   torchrun whose failed ranks print one line
    moge extract RUN_DIR --domain D OUT      a two-level-RRE run's domain sub-model (moge.sigma)
    moge fingerprint A B [C ...]             attention-weight fingerprints, with p-values
    moge upcycle SRC DST --config CONFIG     a dense model -> an exact MoGE run to train on
    moge convert SRC DST --to LAYOUT         weights between moge runs and HF / Pangu layouts (moge.interop)

Exit codes: 0 ok; 1 the run diverged (NaN/Inf loss); 2 a user error (bad config,
override, path, checkpoint, or an OS error such as a full disk), printed as one line
"error: ..." without a traceback; 130 interrupted (Ctrl-C); 143 stopped by SIGTERM after
saving the step in flight. Under torchrun every rank
runs this; messages are printed once (see _should_print).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING

from moge._argtypes import arg_type

if TYPE_CHECKING:  # at run time torch is imported by the handlers that need it (fast --help)
    import torch

EXIT_OK, EXIT_DIVERGED, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130
EXIT_TERMINATED = 143  # 128 + SIGTERM, what shells report for a process SIGTERM ended


class _UsageError(Exception):
    """argparse found bad arguments (reported like any other user error)."""


class _Parser(argparse.ArgumentParser):
    def __init__(self, *args, **kwargs) -> None:
        # Every subcommand's help shows each option's default (see _HelpFormatter).
        kwargs.setdefault("formatter_class", _HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str):  # argparse would print the usage and exit itself
        raise _UsageError(f"{message} (see `{self.prog} --help`)")


def _one_line(err: BaseException) -> str:
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return "; ".join(lines) or type(err).__name__


def _should_print(err: BaseException | None = None) -> bool:
    """Under torchrun most errors hit every rank: rank 0 prints them. Errors the ranks
    agreed on carry `moge_report` (moge.distributed.agree): the one failing rank prints."""
    report = getattr(err, "moge_report", None)
    return report if report is not None else os.environ.get("RANK", "0") == "0"


def _print_error(err: BaseException) -> None:
    rank = os.environ.get("RANK", "0")
    where = f" (rank {rank})" if rank != "0" else ""
    line = f"error{where}: {_one_line(err)}"
    if _should_print(err):
        print(line, file=sys.stderr)
    _write_torchrun_error_file(line)


def _write_torchrun_error_file(line: str) -> None:
    """Under torchrun, hand the launcher our one line: its failure summary then shows it
    instead of a pointer to the docs (the format of torch.distributed.elastic's error files)."""
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if not path:
        return
    import json
    import time

    try:
        with open(path, "w", encoding="utf-8") as f:
            json.dump({"message": {"message": line, "extraInfo": {"timestamp": str(int(time.time()))}}}, f)
    except OSError:
        pass  # the launcher then falls back to its own summary


# ---------------------------------------------------------------- handlers


def _cmd_train(args: argparse.Namespace) -> int:
    from moge.training import train
    from moge.training.config import load_config

    cfg = load_config(args.config, args.overrides)
    result = train(cfg, progress=True)
    if not _should_print():
        return EXIT_OK
    val = f"{result.val_loss:.4f}" if result.val_loss is not None else "n/a"
    loss = f"{result.train_loss:.4f}" if result.train_loss is not None else "n/a"
    print(f"done: step {result.step}, train loss {loss}, val loss {val}, "
          f"{result.tokens_per_s:,.0f} tok/s -> {result.out_dir}")  # fmt: skip
    return EXIT_OK


def _cmd_params(args: argparse.Namespace) -> int:
    from moge.model import format_params
    from moge.training.config import load_config
    from moge.training.limits import parameter_count  # count_parameters in closed form: any depth, at once

    cfg = load_config(args.config, args.overrides)
    count = parameter_count(cfg.model, cfg.moe)
    print(f"{cfg.name}: total {format_params(count.total)} ({count.total:,}), "
          f"activated {format_params(count.activated)} ({count.activated:,}) per token")  # fmt: skip
    return EXIT_OK


def _cmd_eval(args: argparse.Namespace) -> int:
    from moge.tools.evaluate import eval_command

    eval_command(args.run_dirs, batches=args.batches, out=args.out, knockout=args.knockout)
    return EXIT_OK


def _cmd_generate(args: argparse.Namespace) -> int:
    import torch

    from moge.interop import load_model  # a run folder, a checkpoint, or a layout folder
    from moge.training.data import decode

    prompts = _encode_prompts(args.prompt)
    model, cfg, _ = load_model(args.run_dir)
    _check_generate_fits(prompts, args.tokens, cfg.model.max_seq_len, args.run_dir)
    if args.stop_token is not None and args.stop_token >= cfg.model.vocab_size:
        raise ValueError(
            f"--stop-token: {args.stop_token} is outside the vocabulary of {args.run_dir} "
            f"(model.vocab_size={cfg.model.vocab_size})"
        )
    tokens_BL, mask_BL = _left_pad(prompts)
    gen = torch.Generator().manual_seed(args.seed)
    out_BL = model.generate(
        tokens_BL, args.tokens, args.temperature, args.top_k, generator=gen,
        mask=mask_BL, stop_token=args.stop_token, top_p=args.top_p,
    )  # fmt: skip
    for b, prompt_L in enumerate(prompts):
        new_N = out_BL[b, tokens_BL.shape[1] :]
        print(decode(torch.cat([prompt_L, _until_stop(new_N, args.stop_token)])))
    return EXIT_OK


def _prompt_flag(i: int, n: int) -> str:
    """How errors name prompt i of n: "--prompt", or "--prompt #2" among several."""
    return "--prompt" if n == 1 else f"--prompt #{i + 1}"


def _encode_prompts(texts: list[str]) -> list[torch.Tensor]:
    """--prompt texts -> their byte ids, one 1-D int64 tensor each; ValueError naming an
    empty or non-UTF-8 one."""
    from moge.training.data import encode

    prompts = []
    for i, text in enumerate(texts):
        flag = _prompt_flag(i, len(texts))
        if not text:
            raise ValueError(f"{flag}: must not be empty")
        _check_utf8(flag, text)
        prompts.append(encode(text))
    return prompts


def _check_generate_fits(prompts: list[torch.Tensor], tokens: int, limit: int, run_dir: str) -> None:
    """Each prompt must fit max_seq_len, and the longest (every row of the left-padded
    batch is as long) with --tokens more."""
    for i, prompt_L in enumerate(prompts):
        n = prompt_L.numel()
        if n > limit:
            raise ValueError(
                f"{_prompt_flag(i, len(prompts))}: {n} bytes, longer than model.max_seq_len={limit} of "
                f"{run_dir} (the longest sequence the model was built for); shorten it by {n - limit} bytes"
            )
    longest = max(range(len(prompts)), key=lambda i: prompts[i].numel())
    n = prompts[longest].numel()
    if n + tokens > limit:
        which = "the prompt" if len(prompts) == 1 else f"the longest prompt (#{longest + 1})"
        raise ValueError(
            f"--tokens: {which} ({n} bytes) + {tokens} new tokens = {n + tokens} exceed "
            f"model.max_seq_len={limit} of {run_dir} (the longest sequence the model was built for); "
            f"at most {limit - n} new tokens fit after {which.removeprefix('the ')}"
        )


def _left_pad(prompts: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """1-D prompts -> (tokens [B, L], mask [B, L] bool, False on the left padding), L the
    longest: generate's ragged batch (the padding's ids, 0, are never read)."""
    import torch

    L = max(p.numel() for p in prompts)
    tokens_BL = torch.zeros(len(prompts), L, dtype=torch.int64)
    mask_BL = torch.zeros(len(prompts), L, dtype=torch.bool)
    for b, prompt_L in enumerate(prompts):
        tokens_BL[b, L - prompt_L.numel() :] = prompt_L
        mask_BL[b, L - prompt_L.numel() :] = True
    return tokens_BL, mask_BL


def _until_stop(new_N: torch.Tensor, stop_token: int | None) -> torch.Tensor:
    """A row's new ids [N] up to and including its first stop token: generate repeats it
    after a row stops, until the last row of the batch stops."""
    if stop_token is None:
        return new_N
    hits = (new_N == stop_token).nonzero()
    return new_N if len(hits) == 0 else new_N[: int(hits[0]) + 1]


def _cmd_simulate(args: argparse.Namespace) -> int:
    from moge.tools.simulate import simulate_command

    simulate_command(
        args.config, args.devices, args.tokens, args.routers, args.trials, args.tflops,
        args.bandwidth_gbs, args.trace, args.out,
        overrides=args.overrides, seed=args.seed, sigma=args.sigma, training=args.training,
    )  # fmt: skip
    return EXIT_OK


def _cmd_fingerprint(args: argparse.Namespace) -> int:
    from moge.tools.fingerprint import Settings, fingerprint

    settings = Settings(permutations=args.permutations, bootstrap=args.bootstrap, seed=args.seed)
    result = fingerprint(args.models, settings, out_dir=args.out)
    print(result["text"])
    if result["files"]:
        print(f"\nwritten: {', '.join(result['files'].values())}")
    return EXIT_OK


def _add_fingerprint_parser(sub) -> None:
    p = sub.add_parser(
        "fingerprint", help="attention-weight fingerprint of models (arXiv 2507.03014) with p-values"
    )
    p.add_argument(
        "models",
        nargs="+",
        metavar="MODEL",
        help="moge run/checkpoint folders, HF folders or .safetensors files",
    )
    p.add_argument(
        "--permutations",
        type=_non_negative_int,
        default=2000,
        help="layer shuffles for the p-value (0: none)",
    )
    p.add_argument(
        "--bootstrap", type=_non_negative_int, default=1000, help="resamples for the interval (0: none)"
    )
    p.add_argument("--seed", type=_seed, default=0, help="seed of the permutations and the bootstrap")
    p.add_argument("--out", default=None, help="folder for fingerprint.json, .txt and .png")
    p.set_defaults(handler=_cmd_fingerprint)


def _cmd_upcycle(args: argparse.Namespace) -> int:
    from moge.interop.upcycle_run import upcycle_run

    config, *overrides = args.config
    r = upcycle_run(args.src, args.dst, config, overrides, router_init=args.router_init, seed=args.seed)
    print(f"upcycled {args.src} -> {r.checkpoint}: {r.plan.describe()}")
    print(
        f"step-0 check: max |logits - dense logits| = {r.max_abs_diff:.3g} (logits up to {r.max_abs_logit:.3g})"
    )
    print(f"continue training with: moge train {r.out_dir / 'config.yaml'}")
    return EXIT_OK


# ---------------------------------------------------------------- convert (moge.interop)


def _cmd_convert(args: argparse.Namespace) -> int:
    import torch

    from moge.interop import convert

    dtype = None if args.dtype is None else getattr(torch, args.dtype)
    files = convert(args.src, args.dst, to=args.to, dtype=dtype, max_shard_bytes=args.max_shard_bytes)
    print(f"wrote {len(files)} weight file(s) and the config to {args.dst} (layout {args.to})")
    return EXIT_OK


# moge.interop.LAYOUTS and "moge" (a run folder); spelled out so that --help stays light.
CONVERT_LAYOUTS = ("pangu", "qwen3_moe", "qwen2_moe", "mixtral", "llama", "qwen2", "moge")


def _add_convert_parser(sub) -> None:
    p = sub.add_parser("convert", help="convert weights between moge runs and HF / Pangu Pro MoE layouts")
    p.add_argument(
        "src", metavar="SRC", help="a moge run folder or checkpoint, or a layout folder (config.json)"
    )
    p.add_argument("dst", metavar="DST", help="the folder to write")
    p.add_argument("--to", required=True, choices=CONVERT_LAYOUTS, help="the layout to write")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                   help="cast the weights (default: keep each tensor's dtype)")  # fmt: skip
    p.add_argument("--max-shard-bytes", type=_positive_int, default=2 * 1024**3, dest="max_shard_bytes",
                   help="start a new safetensors shard past this size (default 2 GiB)")  # fmt: skip
    p.set_defaults(handler=_cmd_convert)


# ---------------------------------------------------------------- extract (moge.sigma)


def _cmd_extract(args: argparse.Namespace) -> int:
    from moge.sigma.extract import extract_run

    print(f"extracted {extract_run(args.run_dir, args.domain, args.out).summary()}")
    return EXIT_OK


def _add_extract(sub) -> None:
    p = sub.add_parser(
        "extract", help="write one domain's sub-model of a two-level random-router (PanGu-Sigma) run"
    )
    p.add_argument("run_dir", metavar="RUN_DIR", help="a run trained with moe.rre_domain_groups")
    p.add_argument("--domain", required=True, help="domain name (or id) from moe.rre_domain_groups")
    p.add_argument(
        "out", metavar="OUT", help="new run folder for the sub-model (moge eval / generate read it)"
    )
    p.set_defaults(handler=_cmd_extract)


def _parse_mesh(text: str) -> tuple[int | None, int | None]:
    """--mesh "ep=8", "dp=2" or "dp=2,ep=8" -> (ep, dp), None where not given (checked
    against --devices later: a missing one follows from it)."""
    parts = dict(item.split("=", 1) for item in text.split(",") if "=" in item)
    if not parts or set(parts) - {"dp", "ep"} or len(parts) != len(text.split(",")):
        raise ValueError(f"--mesh: expected dp=D,ep=E or ep=E, got {text!r}")
    try:
        sizes = {k: int(v) for k, v in parts.items()}
    except ValueError:
        raise ValueError(f"--mesh: sizes must be integers, got {text!r}") from None
    if min(sizes.values()) < 1:
        raise ValueError(f"--mesh: sizes must be >= 1, got {text!r}")
    return sizes.get("ep"), sizes.get("dp")


def _cmd_plan(args: argparse.Namespace) -> int:
    from moge.tools.plan import format_plan, memory_plan
    from moge.training.config import load_config

    cfg = load_config(args.config, args.overrides)
    mesh_ep, dp = _parse_mesh(args.mesh) if args.mesh else (None, None)
    if mesh_ep is not None and cfg.moe.num_groups % mesh_ep:
        raise ValueError(f"--mesh: ep={mesh_ep} does not divide moe.num_groups={cfg.moe.num_groups}")
    plans = []
    for n in args.devices:
        ep = mesh_ep
        if dp is not None and ep is None:  # dp=D alone: ep is what is left of the devices
            if n % dp:
                raise ValueError(f"--mesh: dp={dp} does not divide --devices {n}")
            ep = n // dp
            if cfg.moe.num_groups % ep:
                raise ValueError(
                    f"--mesh: dp={dp} leaves ep={ep} of --devices {n}, which does not divide "
                    f"moe.num_groups={cfg.moe.num_groups}"
                )
        if ep is not None and n % ep:
            raise ValueError(f"--mesh: ep={ep} does not divide --devices {n}")
        if dp is not None and ep is not None and dp * ep != n:
            raise ValueError(f"--mesh: dp={dp} x ep={ep} = {dp * ep} devices, but --devices {n}")
        plans.append(memory_plan(
            cfg, n, expert_parallel=ep, micro_batch=args.micro_batch, dtype=args.dtype,
            checkpointing=args.checkpointing, device_gb=args.device_gb, device=args.device,
        ))  # fmt: skip
    print(format_plan(cfg, plans))
    return EXIT_OK


def _check_utf8(flag: str, text: str) -> None:
    """argv bytes that are not UTF-8 arrive as lone surrogates; refuse them naming the flag."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        raise ValueError(f"{flag}: not valid UTF-8 text (at character {err.start})") from None


# ---------------------------------------------------------------- parser


_non_negative_int = arg_type(int, lambda v: v >= 0, "an integer >= 0")
_positive_int = arg_type(int, lambda v: v >= 1, "an integer >= 1")
# torch seeds are int64 (negative ones alias large ones).
_seed = arg_type(int, lambda v: 0 <= v < 2**63, "an integer in 0..2**63-1")
_number = arg_type(float, lambda v: True, "a number")
# `not v < 0`-style tests would let NaN through: these comparisons are False for it.
_temperature = arg_type(float, lambda v: v >= 0, "a number >= 0 (0: greedy)")
_top_p = arg_type(float, lambda v: 0 < v <= 1, "a number in (0, 1] (1: off)")


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Every option's help ends with its default: "(default: X)", "(required)" or "(default: off)"."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "(default" in text or action.default is argparse.SUPPRESS:
            return text
        if action.required:
            return f"{text} (required)"
        if isinstance(action, argparse._StoreTrueAction):
            return f"{text} (default: off)"
        if action.default in (None, []) and action.nargs == argparse.ZERO_OR_MORE:
            return f"{text} (default: none)"
        if action.option_strings or action.nargs in (argparse.OPTIONAL, argparse.ZERO_OR_MORE):
            return f"{text} (default: %(default)s)"
        return text


def _subparser(sub, name: str, help_: str) -> argparse.ArgumentParser:
    return sub.add_parser(name, help=help_, description=help_, formatter_class=_HelpFormatter)


CONFIG_HELP = "YAML run config: a path (configs/tiny-moge.yaml) or a preset name from configs/ (tiny-moge)"
OVERRIDES_HELP = (
    "dotted overrides, e.g. train.steps=50 moe.router=global; with overrides the default "
    "train.out_dir is runs/<name>,KEY=VALUE,... (see the README)"
)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="moge",
        description="Mixture of Grouped Experts (Pangu Pro MoE) toolkit",
        formatter_class=_HelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    for name, handler, help_ in (("train", _cmd_train, "train a model"),
                                 ("params", _cmd_params, "count total and activated parameters")):  # fmt: skip
        p = _subparser(sub, name, help_)
        p.add_argument("config", help=CONFIG_HELP)
        p.add_argument("overrides", nargs="*", default=[], metavar="KEY=VALUE", help=OVERRIDES_HELP)
        p.set_defaults(handler=handler)

    p = _subparser(sub, "eval", "evaluate one trained run, or compare several side by side")
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="run folders written by `moge train`")
    p.add_argument(
        "--batches", type=_positive_int, default=None,
        help="validation batches to measure (default: eval.batches of the run's config)",
    )  # fmt: skip
    p.add_argument(
        "--out", default=None,
        help="folder for report.json, the trace and the plots (default: the run folder; "
        "several runs: <parent>/compare-<name1>-vs-<name2>)",
    )  # fmt: skip
    p.add_argument(
        "--knockout", type=_positive_int, nargs="?", const=4, default=None, metavar="N",
        help="also knock out each expert and group, force uniform routing, drop one expert per group: "
        "val loss on N batches (default 4)",
    )  # fmt: skip
    p.set_defaults(handler=_cmd_eval)

    p = _subparser(sub, "generate", "sample text from a trained run (prompt + tokens <= model.max_seq_len)")
    p.add_argument("run_dir", metavar="RUN_DIR", help="run folder written by `moge train`")
    p.add_argument(
        "--prompt", required=True, action="append", metavar="TEXT",
        help="text to continue (bytes); repeat it for several prompts, run as one left-padded batch "
        "and printed in order, each with its continuation (greedy: what it gets alone)",
    )  # fmt: skip
    p.add_argument(
        "--tokens", type=_non_negative_int, default=64,
        help="new bytes to sample; the longest prompt's bytes + tokens must fit model.max_seq_len",
    )  # fmt: skip
    p.add_argument(
        "--temperature", type=_temperature, default=0.8,
        help="sampling temperature; 0: greedy (then --top-k and --top-p do nothing)",
    )  # fmt: skip
    p.add_argument(
        "--top-k", type=_positive_int, default=None, dest="top_k",
        help="sample among the k most likely bytes only (default: None, all 256)",
    )  # fmt: skip
    p.add_argument(
        "--top-p", type=_top_p, default=1.0, dest="top_p", metavar="P",
        help="nucleus sampling, after --temperature and --top-k as in transformers: only the fewest "
        "most likely bytes whose probabilities sum to >= P (0 < P <= 1; 1: off)",
    )  # fmt: skip
    p.add_argument("--seed", type=_seed, default=0, help="seed of the sampler")
    p.add_argument(
        "--stop-token", type=_non_negative_int, default=None, dest="stop_token", metavar="ID",
        help="stop once this token id is sampled (kept); bytes: 10 is a newline (default: None)",
    )  # fmt: skip
    p.set_defaults(handler=_cmd_generate)

    p = _subparser(sub, "simulate", "Monte-Carlo routing on N devices: balance, all-to-all, step time")
    p.add_argument("config", help=CONFIG_HELP)
    p.add_argument("overrides", nargs="*", default=[], metavar="KEY=VALUE", help=OVERRIDES_HELP)
    p.add_argument(
        "--devices", type=_positive_int, nargs="+", required=True, help="device counts to simulate"
    )
    p.add_argument("--tokens", type=_positive_int, nargs="+", required=True, help="tokens per batch")
    p.add_argument(
        "--routers", default="grouped,global,group_limited",
        help="comma-separated: grouped, global, group_limited, grouped_per_device",
    )  # fmt: skip
    p.add_argument(
        "--trials", type=_positive_int, default=None,
        help="random batches per case (default: None, fewer for larger batches)",
    )  # fmt: skip
    p.add_argument("--tflops", type=_number, default=300.0, help="per-device throughput, TFLOP/s")
    p.add_argument(
        "--bandwidth-gbs", type=_number, default=50.0, dest="bandwidth_gbs",
        help="per-device all-to-all bandwidth, GB/s",
    )  # fmt: skip
    p.add_argument(
        "--trace", default=None,
        help="route a recorded trace instead of random scores: RUN_DIR (or its "
        "routing_trace.safetensors) written by `moge eval` (default: None)",
    )  # fmt: skip
    p.add_argument(
        "--out", default=None,
        help="folder for simulation.json/png (default: train.out_dir, else runs/<name>)",
    )  # fmt: skip
    p.add_argument("--seed", type=_seed, default=0, help="seed of the random router scores")
    p.add_argument("--sigma", type=_number, default=1.0, help="std of the random router logits")
    p.add_argument("--training", action="store_true", help="forward+backward: FLOPs x3, all-to-all x2")
    p.set_defaults(handler=_cmd_simulate)

    _add_extract(sub)
    _add_fingerprint_parser(sub)
    _add_upcycle_parser(sub)
    _add_convert_parser(sub)
    p = _subparser(sub, "plan", "per-device bytes of params, grads, AdamW, activations on N devices")
    p.add_argument("config", help=CONFIG_HELP)
    p.add_argument("overrides", nargs="*", default=[], metavar="KEY=VALUE", help=OVERRIDES_HELP)
    p.add_argument(
        "--devices", type=_positive_int, nargs="+", required=True, help="device counts to plan for"
    )
    p.add_argument(
        "--mesh",
        default=None,
        help="ep=E, dp=D or dp=D,ep=E (default: parallel.expert_parallel; a missing size follows from --devices)",
    )
    p.add_argument("--micro-batch", type=_positive_int, default=None, dest="micro_batch",
                   help="sequences per device per micro-batch (default: train.batch_size)")  # fmt: skip
    p.add_argument(
        "--dtype", choices=("float32", "bfloat16"), default=None,
        help="dtype of the activations (default: train.dtype)",
    )  # fmt: skip
    p.add_argument("--checkpointing", action="store_true", help="activation checkpointing of every block")
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda",
                   help="whose kernels the activations follow (attention, expert path)")  # fmt: skip
    p.add_argument("--device-gb", type=_number, default=80.0, dest="device_gb", help="memory per device, GiB")
    p.set_defaults(handler=_cmd_plan)

    # Listed for --help only: main() hands `moge bench ...` to moge.tools.bench's own parser.
    sub.add_parser("bench", help="time the MoGE layer against the dense limit and peers (moge bench --help)")
    # Likewise `moge torchrun ...` goes to moge.distributed.launch.
    sub.add_parser(
        "torchrun",
        help="torchrun [OPTIONS] SUBCOMMAND ...: launch ranks; a failed rank prints one error line",
    )
    return parser


def _add_upcycle_parser(sub) -> None:
    from moge.interop.upcycle import ROUTER_INITS

    p = sub.add_parser(
        "upcycle",
        help="turn a dense model into a MoGE run whose logits equal the dense ones at step 0",
        description="Upcycle a dense model (a moge run whose FFNs are all dense, or a Llama / Qwen2 "
        "layout folder) into a new run folder DST that "
        "`moge train DST/config.yaml` continues; CONFIG gives the moe, data and train sections.",
    )
    p.add_argument(
        "src", metavar="SRC", help="dense moge run or checkpoint folder, or a Llama / Qwen2 layout folder"
    )
    p.add_argument("dst", metavar="DST", help="new run folder (must not exist or be empty)")
    # CONFIG and its overrides in one option: argparse cannot take positionals after an option.
    p.add_argument(
        "--config", nargs="+", required=True, metavar=("CONFIG", "KEY=VALUE"),
        help="run config of the upcycled model, then dotted overrides, e.g. "
        "--config configs/tiny-upcycle.yaml moe.top_k=8",
    )  # fmt: skip
    p.add_argument(
        "--router-init", default="auto", choices=ROUTER_INITS, dest="router_init",
        help="auto (default): uniform for raw gates, random for renormalised copies, replicated "
        "for renormalised slices",
    )  # fmt: skip
    p.add_argument(
        "--seed",
        type=_non_negative_int,
        default=None,
        help="seed of random router rows (default: train.seed)",
    )
    p.set_defaults(handler=_cmd_upcycle)


def main(argv: Sequence[str] | None = None) -> int:
    """Run one subcommand; returns the exit code (see the module docstring)."""
    from moge.distributed.agree import PeerError
    from moge.training import NonFiniteLossError
    from moge.training.runfolder import Terminated

    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        if argv[:1] == ["torchrun"]:  # the launcher owns its options (moge/distributed/launch.py)
            from moge.distributed.launch import main as launch_main

            return launch_main(argv[1:])
        if argv[:1] == ["bench"]:  # the benchmark owns its options (moge/tools/bench.py)
            from moge.tools.bench import main as bench_main

            return bench_main(
                argv[1:], prog="moge bench", parser_class=_Parser, formatter_class=_HelpFormatter
            )
        args = build_parser().parse_args(argv)
        return args.handler(args)
    except SystemExit as exit_:  # --help
        return exit_.code if isinstance(exit_.code, int) else EXIT_OK
    except Terminated as stop:  # SIGTERM: the step finished and was saved (moge.training.runfolder)
        if _should_print():
            print(_one_line(stop), file=sys.stderr)
        return EXIT_TERMINATED
    except KeyboardInterrupt:
        if _should_print():
            print("interrupted (a training run continues with train.resume=true)", file=sys.stderr)
        return EXIT_INTERRUPTED
    except (_UsageError, ValueError, OSError) as err:  # OSError: FileNotFoundError, IsADirectoryError, ...
        _print_error(err)
        return EXIT_USAGE
    except NonFiniteLossError as err:
        _print_error(err)
        return EXIT_DIVERGED
    except PeerError as err:  # another rank failed and printed why
        _print_error(err)
        return EXIT_USAGE if err.usage else EXIT_DIVERGED
