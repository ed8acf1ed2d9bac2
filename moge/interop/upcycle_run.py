"""`moge upcycle SRC DST --config CONFIG`: a dense model -> a MoGE run `moge train` continues.

SRC: a dense moge run folder or checkpoint folder (every FFN dense: model.first_dense_layers
= model.n_layers), or a dense Llama / Qwen2 layout folder (transformers' save_pretrained). DST: a new run folder holding config.yaml and a step-0 checkpoint
(the upcycled weights, a fresh optimiser), with train.out_dir = DST and train.resume = true,
so `moge train DST/config.yaml` trains on from the upcycled weights, with the schedule of
CONFIG's train section starting at step 0. DST/upcycle.json records the plan and the
step-0 check. SRC's special-token ids, generation_config.json and tokenizer files go to
DST/hf/, as `moge convert --to moge` keeps them, so a later `moge convert DST` exports them.

CONFIG is a run config: its moe, data, train, eval and parallel sections describe the
upcycled run. The decoder itself comes from SRC; CONFIG's model section may only choose
which blocks become MoE (first_dense_layers, moe_every: default every block) and what no
weight depends on (max_seq_len, init_std); any other model key it writes must equal SRC's.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from moge.interop import sidefiles
from moge.interop.upcycle import ADJUSTABLE, UpcyclePlan, plan_upcycle, upcycle_model
from moge.model import MoGETransformer
from moge.training.config import (
    RunConfig,
    apply_overrides,
    config_from_dict,
    read_config_yaml,
    resolve_config_path,
    save_config,
)

PROBE_TOKENS = 32  # tokens per sequence of the step-0 check (2 sequences)
STEP0_TOLERANCE = 1e-4  # of the largest |logit|: fp32 rounding of re-ordered sums is ~1e-6


@dataclass
class UpcycleResult:
    out_dir: Path
    checkpoint: Path
    plan: UpcyclePlan
    max_abs_diff: float  # step-0 check: max |logits(upcycled) - logits(dense)| on random tokens
    max_abs_logit: float  # max |logits(dense)| on the same tokens, for scale


def load_dense(src: str | Path) -> MoGETransformer:
    """The dense source model (float32, CPU, eval mode): a moge run or checkpoint folder,
    or a layout folder (config.json: dense Llama / Qwen2, see moge.interop)."""
    from moge.interop import load_model

    model, _, _ = load_model(src)
    assert isinstance(model, MoGETransformer)
    return model.float().eval()


def _read_config(config: str | Path, overrides: Sequence[str]) -> tuple[dict[str, Any], Path]:
    """CONFIG's sections (a path or a preset name, read as strictly as `moge train` reads
    it) with the overrides applied, and the file's path."""
    path = resolve_config_path(config)
    raw = read_config_yaml(path)
    raw.setdefault("name", path.stem)
    return apply_overrides(raw, overrides), path


def upcycle_config(
    dense: MoGETransformer, raw: dict[str, Any], out_dir: Path, source: str = "<config>"
) -> RunConfig:
    """The upcycled run's config: SRC's decoder, CONFIG's other sections, out_dir, resume."""
    raw_model = raw.get("model") or {}
    if not isinstance(raw_model, dict):
        raise ValueError(f"model: expected a mapping of keys, got {type(raw_model).__name__} (in {source})")
    src_model = dataclasses.asdict(dense.cfg)
    model = {**src_model, "first_dense_layers": 0, "moe_every": 1, **raw_model}
    train = {**(raw.get("train") or {}), "out_dir": str(out_dir), "resume": True}
    cfg = config_from_dict({**raw, "model": model, "train": train}, source=source)
    resolved = dataclasses.asdict(cfg.model)
    for key in sorted(raw_model):
        if key not in ADJUSTABLE and resolved.get(key) != src_model.get(key):
            raise ValueError(
                f"model.{key}: {resolved.get(key)!r} in {source} differs from the source model's "
                f"{src_model.get(key)!r}; the decoder comes from the source, so only "
                f"{', '.join(ADJUSTABLE)} may be set"
            )
    return cfg


def _check_plan(dense: MoGETransformer, cfg: RunConfig, router_init: str, source: str) -> None:
    """plan_upcycle's errors, with the config's field names (moe.*) and where they come from."""
    try:
        plan_upcycle(dense.cfg.resolved_dense_hidden, cfg.moe, router_init)
    except ValueError as err:
        field = str(err).split(":", 1)[0]
        if field == "router_init":
            raise ValueError(f"--router-init: {err}") from err
        raise ValueError(f"moe.{err} (in {source}; the source's model.dense_hidden is "
                         f"{dense.cfg.resolved_dense_hidden})") from err  # fmt: skip


def _check_out_dir(out_dir: Path) -> None:
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise ValueError(f"DST: {out_dir} already exists and is not an empty folder")


@torch.no_grad()
def _step0_check(dense: MoGETransformer, model: MoGETransformer, seed: int) -> tuple[float, float]:
    """Max |difference| and max |value| of the two models' logits on random tokens (with
    PanGu-Sigma's domain groups: a sequence of every domain, at least 2 sequences)."""
    L = min(PROBE_TOKENS, model.cfg.max_seq_len, dense.cfg.max_seq_len)
    domains = len(model.moe_cfg.rre_domain_groups or {})
    B = max(2, domains)
    gen = torch.Generator().manual_seed(seed)
    tokens_BL = torch.randint(0, dense.cfg.vocab_size, (B, L), generator=gen)
    domain_ids_B = torch.arange(B) % domains if domains else None
    was = model.training
    model.eval()
    try:
        ref_BLV = dense(tokens_BL).logits.float()
        out_BLV = model(tokens_BL, domain_ids=domain_ids_B).logits.float()
    finally:
        model.train(was)
    return float((out_BLV - ref_BLV).abs().max()), float(ref_BLV.abs().max())


def write_start_checkpoint(model: MoGETransformer, cfg: RunConfig, out_dir: Path) -> Path:
    """A run folder whose step-0 checkpoint holds `model` and a fresh optimiser.

    `moge train out_dir/config.yaml` (cfg.train.out_dir = out_dir, resume = true) then
    trains on from these weights with cfg's schedule from step 0. Returns the checkpoint.
    """
    from moge.training import build_optimizer
    from moge.training.checkpoint import save_checkpoint

    if Path(cfg.train.out_dir or "") != out_dir or not cfg.train.resume:
        raise ValueError(f"train.out_dir: must be {out_dir} with train.resume=true to continue from step 0")
    model.train()
    optimizer = build_optimizer(model, cfg.train)
    data_gen = torch.Generator().manual_seed(cfg.data.seed)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out_dir / "config.yaml")
    return save_checkpoint(out_dir, 0, model, optimizer, data_gen, cfg, cfg.train.keep_last)


def upcycle_run(
    src: str | Path,
    dst: str | Path,
    config: str | Path,
    overrides: Sequence[str] = (),
    *,
    router_init: str = "auto",
    seed: int | None = None,
) -> UpcycleResult:
    """Upcycle SRC into a new run folder DST (see the module docstring). seed: router rows
    (default: CONFIG's train.seed)."""
    out_dir = Path(dst)
    _check_out_dir(out_dir)
    dense = load_dense(src)
    side, token_ids = sidefiles.read_source(Path(src))  # before writing: a damaged file stops here
    raw, config_path = _read_config(config, overrides)
    cfg = upcycle_config(dense, raw, out_dir, source=str(config_path))
    seed = cfg.train.seed if seed is None else seed
    _check_plan(dense, cfg, router_init, str(config))
    model, plan = upcycle_model(dense, cfg.moe, cfg.model, router_init=router_init, seed=seed)
    diff, scale = _step0_check(dense, model, seed)
    if not diff <= STEP0_TOLERANCE * max(1.0, scale):  # a bug, not a user error: never write such a run
        raise RuntimeError(
            f"upcycling is not exact: max |logits - dense logits| = {diff:.3g} (logits up to {scale:.3g})"
        )
    ckpt = write_start_checkpoint(model, cfg, out_dir)
    sidefiles.store_in_run(side, token_ids, out_dir)  # token ids, tokenizer: `moge convert DST` exports them
    record = {
        "source": str(src), "config": str(config), "overrides": list(overrides), "seed": seed,
        "plan": dataclasses.asdict(plan), "step0_max_abs_logit_diff": diff, "step0_max_abs_logit": scale,
    }  # fmt: skip
    (out_dir / "upcycle.json").write_text(json.dumps(record, indent=1) + "\n", encoding="utf-8")
    return UpcycleResult(out_dir, ckpt, plan, diff, scale)
