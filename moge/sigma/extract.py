"""Cut one domain's sub-model out of a two-level-RRE model (`moge extract RUN --domain D OUT`).

Legend: E experts, M groups, G experts per group, n groups of the domain, D d_model.

A domain's tokens only ever reach the experts of its groups (moge.sigma.routing), so
the sub-model keeps those groups' experts (their slices of the stacked expert weights,
router rows, learned expert scales and balance biases) and every shared part (embedding,
attention, norms, shared experts, dense blocks, LM head), renumbers the groups 0..n-1
and records their old numbers in `moe.rre_group_ids`, which redraws exactly their
columns of the token-id table. On the domain's data its logits are those of the full
model, bit for bit (tests/sigma/test_sigma_extract.py). The output is a run folder that
`moge eval` and `moge generate` read like any other.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from moge.layer import MoGELayer
from moge.model import MoGETransformer, count_parameters, format_params
from moge.sigma.routing import reachable_experts
from moge.training.checkpoint import load_run, save_checkpoint
from moge.training.config import RunConfig, save_config

# Tensors of a MoGELayer with one row per routed expert (its state_dict keys).
PER_EXPERT_KEYS = (
    "router.weight",
    "experts.w_gate_up_EDH",
    "experts.w_down_EFD",
    "expert_scale_E",
    "balance_bias_E",
)
EXTRACT_NAME = "extract.json"


def resolve_domain(cfg: RunConfig, domain: str) -> str:
    """The domain's name (a name, or its id as a string); ValueError naming the known ones."""
    groups = cfg.moe.rre_domain_groups
    if not groups:
        raise ValueError(
            f"--domain: run {cfg.name!r} routes without domains (moe.rre_domain_groups is not set); "
            "only a two-level random-router model has domain sub-models"
        )
    names = list(groups)
    if domain in groups:
        return domain
    if domain.isdigit() and str(int(domain)) == domain and int(domain) < len(names):  # "01" is no id
        return names[int(domain)]
    raise ValueError(f"--domain: unknown domain {domain!r}; the run's domains are {', '.join(names)}")


def domain_config(cfg: RunConfig, domain: str, out_dir: str | Path | None = None) -> RunConfig:
    """The sub-model's run config: domain's groups renumbered 0..n-1, data of that domain alone."""
    moe = cfg.moe
    assert moe.rre_domain_groups is not None, "resolve_domain checked it"
    groups = sorted(moe.rre_domain_groups[domain])
    old_ids = moe.rre_group_ids or list(range(moe.num_groups))
    n, G = len(groups), moe.experts_per_group
    sub_moe = dataclasses.replace(
        moe, num_experts=n * G, num_groups=n, rre_domain_groups={domain: list(range(n))},
        rre_group_ids=[old_ids[g] for g in groups],
    )  # fmt: skip
    data = cfg.data
    if data.domains is not None:
        data = dataclasses.replace(data, only_domain=domain)
    train = dataclasses.replace(cfg.train, out_dir=None if out_dir is None else str(out_dir), resume=False)
    return dataclasses.replace(cfg, name=f"{cfg.name}-{domain}", moe=sub_moe, data=data, train=train)


def extract_state_dict(model: MoGETransformer, domain: str) -> dict[str, torch.Tensor]:
    """The full model's state dict with every MoE layer's per-expert tensors cut to the domain's experts."""
    moe = model.moe_cfg
    assert moe.rre_domain_groups is not None, "resolve_domain checked it"
    keep = torch.tensor(reachable_experts(moe.rre_domain_groups, domain, moe.experts_per_group))
    state = model.state_dict()
    for prefix, module in model.named_modules():
        if not isinstance(module, MoGELayer):
            continue
        for key, tensor in module.state_dict().items():
            full_key = f"{prefix}.{key}"
            if key in PER_EXPERT_KEYS:
                state[full_key] = tensor.index_select(0, keep.to(tensor.device)).clone()
            elif not key.startswith("shared.") and tensor.dim() and tensor.shape[0] == moe.num_experts:
                # A new per-expert tensor nobody taught extraction about: refuse, never guess.
                raise RuntimeError(
                    f"extract: no rule for {full_key} {tuple(tensor.shape)} (add it to PER_EXPERT_KEYS)"
                )
    return state


def extract_model(model: MoGETransformer, cfg: RunConfig, domain: str) -> tuple[MoGETransformer, RunConfig]:
    """(sub-model in eval mode, its config) of `domain` (a name or id) of a two-level-RRE model.

    Every tensor keeps the full model's dtype and device (a bf16 model gives a bf16
    sub-model) and is a copy: training the sub-model leaves the full model alone.
    """
    domain = resolve_domain(cfg, domain)
    sub_cfg = domain_config(cfg, domain)
    with torch.device("meta"):
        sub = MoGETransformer(sub_cfg.model, sub_cfg.moe)
    state = {k: v.clone() for k, v in extract_state_dict(model, domain).items()}
    sub.load_state_dict(state, strict=True, assign=True)
    # Buffers derived from the config (RoPE tables, the RRE table) are not in the state
    # dict: made afresh, in the dtype and on the device of the full model's same buffer.
    device = next(model.parameters()).device
    source = dict(model.named_buffers())
    for name, buf in MoGETransformer(sub_cfg.model, sub_cfg.moe).named_buffers():
        if name in state:
            continue
        like = source.get(name)
        if like is not None and like.is_floating_point() and buf.is_floating_point():
            buf = buf.to(like.dtype)
        owner, _, attr = name.rpartition(".")
        setattr(sub.get_submodule(owner), attr, buf.to(device))
    return sub.eval(), sub_cfg


@dataclass
class ExtractResult:
    domain: str
    groups: list[int]  # the domain's groups in the full model
    experts: list[int]  # the routed experts kept (ids in the full model)
    params_full: int
    params_sub: int
    activated_sub: int  # per token: the same experts as in the full model, fewer router rows
    step: int
    out_dir: Path

    @property
    def saving(self) -> float:
        """Share of the full model's parameters the sub-model does without."""
        return 1.0 - self.params_sub / self.params_full

    def summary(self) -> str:
        return (
            f"domain {self.domain!r}: groups {self.groups} (routed experts {_spans(self.experts)}), "
            f"{format_params(self.params_sub)} parameters ({self.params_sub:,}) of {format_params(self.params_full)} "
            f"({self.params_full:,}): {self.saving:.1%} fewer; {format_params(self.activated_sub)} "
            f"activated per token -> {self.out_dir}"
        )


def _spans(ids: list[int]) -> str:
    """Ascending ids as runs, "6..8, 21..23": groups need not be neighbours."""
    runs = [[ids[0], ids[0]]]
    for i in ids[1:]:
        if i == runs[-1][1] + 1:
            runs[-1][1] = i
        else:
            runs.append([i, i])
    return ", ".join(f"{a}..{b}" if b > a else str(a) for a, b in runs)


def _write_metrics(src: Path, out: Path, record: dict) -> None:
    """The source run's training metrics (the sub-model was trained by that run) plus one extract record."""
    metrics = src / "metrics.jsonl"
    if metrics.is_file():
        shutil.copyfile(metrics, out / "metrics.jsonl")
    with open(out / "metrics.jsonl", "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")


def extract_run(run_dir: str | Path, domain: str, out_dir: str | Path) -> ExtractResult:
    """Write `domain`'s sub-model of a run's newest checkpoint as a new run folder `out_dir`."""
    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"OUT: {out} already exists and is not an empty folder; choose another")
    from moge.training import build_optimizer  # the trainer's parameter groups, so the run can resume

    model, cfg, step = load_run(run_dir)
    assert isinstance(model, MoGETransformer)
    sub, _ = extract_model(model, cfg, domain)
    name = resolve_domain(cfg, domain)
    sub_cfg = domain_config(cfg, name, out)
    out.mkdir(parents=True, exist_ok=True)
    save_config(sub_cfg, out / "config.yaml")
    gen = torch.Generator().manual_seed(sub_cfg.data.seed)
    save_checkpoint(out, step, sub, build_optimizer(sub, sub_cfg.train), gen, sub_cfg, keep_last=1)
    full, part = count_parameters(cfg.model, cfg.moe), count_parameters(sub_cfg.model, sub_cfg.moe)
    assert cfg.moe.rre_domain_groups is not None, "resolve_domain checked it"
    groups = sorted(cfg.moe.rre_domain_groups[name])
    result = ExtractResult(
        domain=name, groups=groups, experts=reachable_experts(cfg.moe.rre_domain_groups, name, cfg.moe.experts_per_group),
        params_full=full.total, params_sub=part.total, activated_sub=part.activated, step=step, out_dir=out,
    )  # fmt: skip
    record = {
        "type": "extract", "step": step, "source": str(run_dir), "domain": name, "groups": groups,
        "params_full": full.total, "params_sub": part.total, "saving": result.saving,
    }  # fmt: skip
    _write_metrics(Path(run_dir), out, record)
    (out / EXTRACT_NAME).write_text(
        json.dumps({**record, "experts": result.experts}, indent=1) + "\n", encoding="utf-8"
    )
    return result
