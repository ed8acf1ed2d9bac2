"""What the layer benchmark times: the dense limit, the MoGE layer, its router, and the
peers (the plain per-expert loop, the layer's slower expert paths, and the Hugging Face
transformers MoE blocks when transformers >= 5 is installed).

Legend: T tokens, D d_model, F expert hidden, E experts, M groups, K experts per token.
moge/tools/bench.py times them.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F_
from torch import Tensor, nn

from moge.kernels.precision import matmul_dtype
from moge.layer import MoGEConfig, MoGELayer

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


@dataclass(frozen=True)
class BenchShape:
    """Sizes of one benchmark: tokens, d_model, expert hidden, experts, groups, top-k."""

    tokens: int = 4096
    d_model: int = 512
    hidden: int = 256
    experts: int = 16
    groups: int = 4
    top_k: int = 4

    def __post_init__(self) -> None:
        for name in ("tokens", "d_model", "hidden", "experts", "groups", "top_k"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: must be >= 1, got {getattr(self, name)}")
        if self.experts % self.groups or self.top_k % self.groups:
            raise ValueError(
                f"groups: {self.groups} must divide experts={self.experts} and top_k={self.top_k}"
            )

    def describe(self) -> str:
        s = self
        return f"T={s.tokens} d={s.d_model} f={s.hidden} E={s.experts} M={s.groups} K={s.top_k}"


SHAPES = {
    "small": BenchShape(),
    "large": BenchShape(tokens=4096, d_model=1024, hidden=512, experts=64, groups=8, top_k=8),
}


# --- what is timed: a Case maps an input to (output, extra loss) -----------------------------


@dataclass
class Case:
    """One implementation. step(x) -> (y, extra loss or None); backward seeds y and adds the loss."""

    name: str
    kind: str  # "limit", "moge", "peer" or "part"
    module: nn.Module
    step: Callable[[Tensor], tuple[Tensor, Tensor | None]]
    optional: bool = False  # may be skipped, or sampled less, when one call is slow


class DenseSwiGLU(nn.Module):
    """The limit: a plain dense SwiGLU of width K*F with nn.Linear, as most code writes it.

    products_fp32=True runs the products in float32 on up-cast operands (for a dtype the
    CPU has no matrix instructions for), with storage and output still in the dtype.
    """

    def __init__(self, d_model: int, hidden: int, products_fp32: bool = False) -> None:
        super().__init__()
        self.w_gate_up = nn.Linear(d_model, 2 * hidden, bias=False)
        self.w_down = nn.Linear(hidden, d_model, bias=False)
        self.products_fp32 = products_fp32

    def _lin(self, x: Tensor, w: Tensor) -> Tensor:
        if self.products_fp32:
            return F_.linear(x.float(), w.float()).to(x.dtype)
        return F_.linear(x, w)

    def forward(self, x: Tensor) -> Tensor:
        gate, up = self._lin(x, self.w_gate_up.weight).chunk(2, dim=-1)
        return self._lin(F_.silu(gate) * up, self.w_down.weight)


class NaiveLoopMoE(nn.Module):
    """The per-expert loop most codebases use, through autograd, with a MoGE router.

    For every expert: find its (token, slot) pairs, index the tokens, run the SwiGLU,
    index_add the gated output. Shares the weights of `layer`.
    """

    def __init__(self, layer: MoGELayer) -> None:
        super().__init__()
        self.layer = layer

    def forward(self, x_TD: Tensor) -> Tensor:
        layer = self.layer
        out = layer.route_tokens(x_TD, None, tuple(x_TD.shape[:-1]))
        w1, w2 = layer.experts.w_gate_up_EDH, layer.experts.w_down_EFD
        F = w2.shape[1]
        y_TD = torch.zeros_like(x_TD)
        for e in range(w1.shape[0]):
            tok, slot = (out.expert_ids == e).nonzero(as_tuple=True)
            if tok.numel() == 0:
                continue
            gate, up = (x_TD[tok] @ w1[e]).split(F, dim=-1)
            y = (F_.silu(gate) * up) @ w2[e]
            y_TD = y_TD.index_add(0, tok, y * out.weights[tok, slot, None].to(y.dtype))
        return y_TD


def reset_grads(case: Case) -> None:
    """Every timed call starts with no weight gradient (none to accumulate into)."""
    for p in case.module.parameters():
        p.grad = None


def backward_of(y: Tensor, extra: Tensor | None, gy: Tensor) -> None:
    """A training call's backward: gy seeds y (ones where y has another shape, as the
    router-only case's gates) and the extra loss adds with weight 1."""
    g = gy if y.shape == gy.shape else torch.ones_like(y)
    if extra is None:
        y.backward(g)
    else:
        torch.autograd.backward([y, extra], [g, torch.ones_like(extra)])


def init_(module: nn.Module, std: float = 0.02, seed: int = 0) -> nn.Module:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * std)
    return module


def plain_step(module: nn.Module) -> Callable[[Tensor], tuple[Tensor, None]]:
    """A Case step for a module that returns y and no extra loss."""
    return lambda x: (module(x), None)


def moge_case(name: str, layer: MoGELayer, optional: bool = False) -> Case:
    def step(x: Tensor):
        out = layer(x)
        return out.hidden, out.aux_loss

    return Case(name, "moge", layer, step, optional)


def router_case(layer: MoGELayer) -> Case:
    def step(x: Tensor):
        out = layer.route_tokens(x, None, tuple(x.shape[:-1]))
        return out.weights, out.aux_loss

    return Case("moge router only (logits, softmax, grouped top-k, losses, load)", "part", layer, step)


# --- transformers peers ------------------------------------------------------------------------


def transformers_version() -> str | None:
    try:
        import transformers
    except ImportError:
        return None
    return transformers.__version__


def _hf_blocks(shape: BenchShape) -> list[tuple[str, Callable[[str], nn.Module]]]:
    """(name, build(experts_implementation) -> block) for the three HF MoE blocks."""
    from transformers.models.deepseek_v3.configuration_deepseek_v3 import DeepseekV3Config
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3MoE
    from transformers.models.mixtral.configuration_mixtral import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock
    from transformers.models.qwen3_moe.configuration_qwen3_moe import Qwen3MoeConfig
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock

    s = shape

    def qwen(impl: str) -> nn.Module:
        cfg = Qwen3MoeConfig(
            hidden_size=s.d_model, moe_intermediate_size=s.hidden, num_experts=s.experts,
            num_experts_per_tok=s.top_k, norm_topk_prob=False,
        )  # fmt: skip
        cfg._experts_implementation = impl
        return Qwen3MoeSparseMoeBlock(cfg)

    def mixtral(impl: str) -> nn.Module:
        cfg = MixtralConfig(
            hidden_size=s.d_model, intermediate_size=s.hidden, num_local_experts=s.experts,
            num_experts_per_tok=s.top_k, router_jitter_noise=0.0,
        )  # fmt: skip
        cfg._experts_implementation = impl
        return MixtralSparseMoeBlock(cfg)

    def deepseek(impl: str) -> nn.Module:
        # No shared expert (n_shared_experts=0 builds a zero-width one, which costs ~0),
        # so every block does the same routed work. Groups as MoGE's, keep half of them.
        cfg = DeepseekV3Config(
            hidden_size=s.d_model, moe_intermediate_size=s.hidden, n_routed_experts=s.experts,
            num_experts_per_tok=s.top_k, n_group=s.groups, topk_group=max(1, s.groups // 2),
            n_shared_experts=0, routed_scaling_factor=1.0,
        )  # fmt: skip
        cfg._experts_implementation = impl
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Initializing zero-element tensors")
            return DeepseekV3MoE(cfg)

    return [("Qwen3-MoE", qwen), ("Mixtral", mixtral), ("DeepSeek-V3", deepseek)]


def hf_cases(shape: BenchShape, dtype: torch.dtype, seed: int) -> list[Case]:
    cases = []
    for name, build in _hf_blocks(shape):
        for impl in ("eager", "grouped_mm"):
            block = init_(build(impl), seed=seed).to(dtype)

            def step(x: Tensor, block=block):
                return block(x.unsqueeze(0)).squeeze(0), None

            cases.append(Case(f"transformers {name} ({impl})", "peer", block, step, optional=True))
    return cases


# --- building the cases of one (shape, dtype) --------------------------------------------------


def layer_for(shape: BenchShape, impl: str, dtype: torch.dtype, seed: int) -> MoGELayer:
    torch.manual_seed(seed)
    cfg = MoGEConfig(
        d_model=shape.d_model, num_experts=shape.experts, num_groups=shape.groups, top_k=shape.top_k,
        expert_hidden=shape.hidden, expert_impl=impl,
    )  # fmt: skip
    return MoGELayer(cfg).to(dtype)


def dense_cases(
    shape: BenchShape, dtype: torch.dtype, seed: int = 0, fastest_only: bool = False,
    device: torch.device | None = None,
) -> list[Case]:  # fmt: skip
    """The dense limit. In a dtype the CPU has no matrix instructions for, the fp32
    products variant is the limit and torch's own (slow) matmul an optional row.
    device: whose matmul decides that (None: the CPU); the modules are built on the CPU."""
    width = shape.top_k * shape.hidden
    upcast = matmul_dtype(device or torch.device("cpu"), dtype) != dtype
    variants = [] if upcast and fastest_only else [(False, f"dense SwiGLU width K*f={width} (torch matmul)")]
    if upcast:
        variants.append((True, f"dense SwiGLU width K*f={width} (fp32 products)"))
    cases = []
    for fp32, name in variants:
        dense = init_(DenseSwiGLU(shape.d_model, width, fp32), seed=seed).to(dtype)
        cases.append(Case(name, "limit", dense, plain_step(dense), optional=upcast and not fp32))
    return cases


def build_cases(
    shape: BenchShape, dtype: torch.dtype, peers: bool, seed: int = 0, compiled: bool = False,
    fastest_limit_only: bool = False,
) -> tuple[list[Case], list[str]]:  # fmt: skip
    """Every implementation at `shape` in `dtype`, and notes on what was left out.
    fastest_limit_only: only the dense variant that is the limit (see dense_cases)."""
    cases = dense_cases(shape, dtype, seed, fastest_only=fastest_limit_only)
    fused = layer_for(shape, "fused", dtype, seed)
    cases.append(moge_case("moge MoGELayer (fused, default)", fused))
    cases.append(router_case(fused))
    notes = []
    if compiled:
        layer = layer_for(shape, "fused", dtype, seed)
        layer.experts.compile_elementwise = True
        cases.append(moge_case("moge MoGELayer (fused, torch.compile elementwise)", layer))
    if peers:
        # The layer's other expert paths use torch's own matmul: slow in bf16 without bf16 instructions.
        for name, impl in (
            ("sort + torch._grouped_mm", "grouped_mm"),
            ("sort + per-expert autograd", "loop"),
        ):
            cases.append(
                moge_case(f"moge MoGELayer ({name})", layer_for(shape, impl, dtype, seed), optional=True)
            )
        naive = NaiveLoopMoE(layer_for(shape, "fused", dtype, seed))
        cases.append(Case("naive per-expert loop (MoGE router)", "peer", naive, plain_step(naive), True))
        version = transformers_version()
        if version is None:
            notes.append(
                "transformers peers skipped: transformers is not installed (pip install 'moge[bench]')"
            )
        elif int(version.split(".")[0]) < 5:
            notes.append(f"transformers peers skipped: transformers {version} < 5")
        else:
            cases.extend(hf_cases(shape, dtype, seed))
    return cases, notes
