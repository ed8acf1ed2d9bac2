"""A decoder-only language model whose FFNs are MoGE layers or dense SwiGLUs.

Legend: B batch, L new tokens, S key positions (cached + new), P max positions,
D d_model, H query heads, N KV heads, C head dim, V vocabulary.

Left padding (generate's mask, KVCache.pad_B): row b's first pad_B[b] cache slots hold
padding. Its real tokens then sit at positions slot - pad_B[b] (the first at 0) and no
real token attends to a padded slot, so each row computes what its prompt alone does.
"""

from __future__ import annotations

import functools
import math
import numbers
import operator
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from moge.experts import NormalLinear, SwiGLU
from moge.kernels.sdpa import scaled_dot_product_attention
from moge.layer import MoGEConfig, MoGELayer, MoGEOutput, init_meta_buffers, total_aux_loss
from moge.model.config import ModelConfig
from moge.model.init import Locate, draw_seed, fill_normal_
from moge.model.recompute import checkpoint_block

IGNORE_INDEX = -100  # targets with this id do not count in the LM loss
# The attribute that holds a parameter's init std on its module (see NormalLinear), by the
# parameter's own name: NormalLinear, NormalEmbedding, Router; GroupedExperts.
_STD_ATTRS = {"weight": "init_std", "w_gate_up_EDH": "init_std", "w_down_EFD": "down_std"}


class RMSNorm(nn.Module):
    """x / rms(x) * weight, computed in float32 so bf16 activations keep their precision."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def reset_parameters(self) -> None:
        """weight [D] = 1 (module-by-module init loops call this after a meta-device build)."""
        nn.init.ones_(self.weight)

    def forward(self, x_BLD: torch.Tensor) -> torch.Tensor:
        x32_BLD = x_BLD.float()
        if not (torch.is_grad_enabled() and (x_BLD.requires_grad or self.weight.requires_grad)):
            # torch's kernel does the same float32 ops (equal results, tested) in fewer
            # calls: measured 22 against 30 us a call when decoding; with autograd the
            # plain ops below measured faster forward + backward.
            return F.rms_norm(x32_BLD, (x32_BLD.shape[-1],), self.weight.float(), self.eps).to(x_BLD.dtype)
        y_BLD = x32_BLD * torch.rsqrt(x32_BLD.pow(2).mean(-1, keepdim=True) + self.eps)
        return (y_BLD * self.weight.float()).to(x_BLD.dtype)


class NormalEmbedding(nn.Embedding):
    """nn.Embedding whose reset_parameters() draws weight [V, D] ~ N(0, init_std), not
    nn.Embedding's N(0, 1): a module-by-module init loop then gives the model's init
    (see moge.experts.NormalLinear)."""

    def __init__(self, num_embeddings: int, embedding_dim: int, init_std: float = 0.02) -> None:
        self.init_std = init_std  # before nn.Embedding.__init__, which calls reset_parameters()
        super().__init__(num_embeddings, embedding_dim)

    def reset_parameters(self) -> None:
        nn.init.normal_(self.weight, std=self.init_std)


class RotaryEmbedding(nn.Module):
    """Rotate-half RoPE with cos/sin tables for every position up to max_seq_len."""

    cos_PC: torch.Tensor
    sin_PC: torch.Tensor

    def __init__(self, head_dim: int, max_seq_len: int, theta: float) -> None:
        super().__init__()
        self.args = (head_dim, max_seq_len, theta)
        inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
        angle_PC2 = torch.outer(torch.arange(max_seq_len, dtype=torch.float32), inv_freq)
        angle_PC = torch.cat((angle_PC2, angle_PC2), dim=-1)
        # Non-persistent: derived from the config, so checkpoints need not carry them.
        self.register_buffer("cos_PC", angle_PC.cos(), persistent=False)
        # rotate_half(x) * sin = cat(-x2, x1) * sin = roll(x, C/2) * cat(-sin1, sin2): the
        # sign lives in the table (the same products, bit for bit) and one roll replaces
        # chunk, neg and cat.
        sin_PC = angle_PC.sin()
        sin_PC[:, : head_dim // 2] *= -1
        self.register_buffer("sin_PC", sin_PC, persistent=False)

    def init_buffers(self, device: torch.device | str | None = None) -> None:
        """The tables again (a meta-device build has none): computed on the CPU, moved to
        `device` (None: the default device)."""
        with torch.device("cpu"):
            fresh = RotaryEmbedding(*self.args)
        for name, table in fresh.named_buffers():
            setattr(self, name, table.to(torch.get_default_device() if device is None else device))

    def reset_parameters(self) -> None:
        """The tables again, where they are: a module-by-module init loop after a meta-device
        build and to_empty (FSDP calls it on modules with buffers) leaves them computed."""
        self.init_buffers(self.cos_PC.device)

    def _apply(self, fn, recurse=True):
        """nn.Module's conversions, except that the tables stay float32 (exactly their values)
        when the module goes to a narrower float: a bf16 table would rotate every position
        with rounded angles (as MoGELayer._apply keeps its balance bias)."""
        before = {name: self._buffers.get(name) for name in ("cos_PC", "sin_PC")}
        out = super()._apply(fn, recurse)
        for name, old in before.items():
            new = self._buffers.get(name)
            if old is None or new is None or new.dtype not in (torch.float16, torch.bfloat16):
                continue
            exact = old.dtype == torch.float32 and not old.is_meta
            self._buffers[name] = old.to(new.device) if exact else new.float()
        return out

    def forward(self, x_BHLC: torch.Tensor, start: int, pos_BL: torch.Tensor | None = None) -> torch.Tensor:
        """Rotate x [B, heads, L, C] as if it sat at positions start .. start+L-1, or,
        given pos_BL [B, L], at those positions (each row its own: left padding)."""
        L, C = x_BHLC.shape[-2:]
        # The tables are float32 even after .to(bf16) (_apply); .float() is for tables set by hand.
        if pos_BL is None:
            cos_LC = self.cos_PC[start : start + L].float()
            signed_sin_LC = self.sin_PC[start : start + L].float()
        else:  # [B, 1, L, C]: the same table rows, gathered per sequence
            cos_LC = self.cos_PC[pos_BL][:, None].float()
            signed_sin_LC = self.sin_PC[pos_BL][:, None].float()
        x32 = x_BHLC.float()
        return (x32 * cos_LC + x32.roll(C // 2, dims=-1) * signed_sin_LC).to(x_BHLC.dtype)


class KVCache:
    """Keys and values of every layer, [B, N, max_len, C] each, plus the next position.

    Tensors are allocated at the first write, so they take the dtype/device the
    projections produce (bf16 under autocast).
    pad_B [B] int or None: row b's first pad_B[b] slots are left padding (module docstring).
    """

    def __init__(self, n_layers: int, max_len: int, pad_B: torch.Tensor | None = None) -> None:
        self.max_len = max_len
        self.pos = 0
        self.pad_B = pad_B
        self.k: list[torch.Tensor | None] = [None] * n_layers
        self.v: list[torch.Tensor | None] = [None] * n_layers

    def update(
        self, layer: int, k_BNLC: torch.Tensor, v_BNLC: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Store the new keys/values at pos..pos+L; return all of them so far [B, N, S, C]."""
        B, N, L, C = k_BNLC.shape
        if self.k[layer] is None:
            self.k[layer] = k_BNLC.new_zeros(B, N, self.max_len, C)
            self.v[layer] = v_BNLC.new_zeros(B, N, self.max_len, C)
        k_cache, v_cache = self.k[layer], self.v[layer]
        assert k_cache is not None and v_cache is not None
        assert k_cache.shape[0] == B and self.pos + L <= self.max_len, "checked by the model"
        k_cache[:, :, self.pos : self.pos + L] = k_BNLC
        v_cache[:, :, self.pos : self.pos + L] = v_BNLC
        return k_cache[:, :, : self.pos + L], v_cache[:, :, : self.pos + L]

    def advance(self, n: int) -> None:
        self.pos += n

    @property
    def batch(self) -> int | None:
        """The number of sequences cached (None before the first write)."""
        k_cache = next((k for k in self.k if k is not None), None)
        return None if k_cache is None else k_cache.shape[0]


class Attention(nn.Module):
    """Grouped-query self-attention with RoPE; q/k/v and o biases and q/k norms optional."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.n_heads, self.n_kv_heads, C = cfg.n_heads, cfg.n_kv_heads, cfg.resolved_head_dim
        # NormalLinear: a model sets their init stds (MoGETransformer.init_weights' rule).
        self.q_proj = NormalLinear(cfg.d_model, self.n_heads * C, bias=cfg.qkv_bias)
        self.k_proj = NormalLinear(cfg.d_model, self.n_kv_heads * C, bias=cfg.qkv_bias)
        self.v_proj = NormalLinear(cfg.d_model, self.n_kv_heads * C, bias=cfg.qkv_bias)
        self.o_proj = NormalLinear(self.n_heads * C, cfg.d_model, bias=cfg.o_bias)
        # Qwen3: every head's query and key are RMS-normalised (one [C] weight each) before RoPE.
        self.q_norm = RMSNorm(C, cfg.norm_eps) if cfg.qk_norm else None
        self.k_norm = RMSNorm(C, cfg.norm_eps) if cfg.qk_norm else None

    def forward(
        self, x_BLD: torch.Tensor, rope: RotaryEmbedding, cache: KVCache | None, layer: int
    ) -> torch.Tensor:
        start = cache.pos if cache is not None else 0
        pad_B = cache.pad_B if cache is not None else None
        q_BHLC = rearrange(self.q_proj(x_BLD), "b l (h c) -> b h l c", h=self.n_heads)
        k_BNLC = rearrange(self.k_proj(x_BLD), "b l (n c) -> b n l c", n=self.n_kv_heads)
        if self.q_norm is not None and self.k_norm is not None:
            q_BHLC, k_BNLC = self.q_norm(q_BHLC), self.k_norm(k_BNLC)
        L = q_BHLC.shape[2]
        pos_BL = None
        if pad_B is not None:  # padded slots get position 0: no real token reads them
            slot_L = torch.arange(start, start + L, device=x_BLD.device)
            pos_BL = (slot_L[None, :] - pad_B[:, None]).clamp_min(0)
        q_BHLC, k_BNLC = rope(q_BHLC, start, pos_BL), rope(k_BNLC, start, pos_BL)
        v_BNLC = rearrange(self.v_proj(x_BLD), "b l (n c) -> b n l c", n=self.n_kv_heads)
        if cache is not None:
            k_BNSC, v_BNSC = cache.update(layer, k_BNLC, v_BNLC)
        else:
            k_BNSC, v_BNSC = k_BNLC, v_BNLC
        S = k_BNSC.shape[2]
        if pad_B is not None:
            out_BHLC = scaled_dot_product_attention(
                q_BHLC, k_BNSC, v_BNSC, attn_mask=_left_padded_mask(pad_B, start, L, S)
            )
            return self.o_proj(rearrange(out_BHLC, "b h l c -> b l (h c)"))
        mask_LS = None
        if start > 0 and L > 1:
            # is_causal aligns the mask top-left, which is wrong once S > L: new token i
            # sits at position start+i and sees every key up to there.
            pos_L = torch.arange(start, start + L, device=x_BLD.device)
            mask_LS = torch.arange(S, device=x_BLD.device)[None, :] <= pos_L[:, None]
        # start == 0: S == L and plain causal is right; one new token after a prefix sees all.
        # Query head h reads KV head h // (H/N), without a repeated copy of k and v.
        out_BHLC = scaled_dot_product_attention(
            q_BHLC, k_BNSC, v_BNSC, attn_mask=mask_LS, is_causal=(start == 0 and L > 1)
        )
        return self.o_proj(rearrange(out_BHLC, "b h l c -> b l (h c)"))


def _left_padded_mask(pad_B: torch.Tensor, start: int, L: int, S: int) -> torch.Tensor:
    """[B, 1, L, S] bool (True: may attend) for new slots start .. start+L-1 of a cache
    whose row b begins with pad_B[b] padded slots: causal, padded keys masked.

    A padded query also sees itself, so no row is all masked (softmax would give NaN);
    its output is never read by a real token.
    """
    slot_L = torch.arange(start, start + L, device=pad_B.device)
    key_S = torch.arange(S, device=pad_B.device)
    causal_LS = key_S[None, :] <= slot_L[:, None]
    real_BS = key_S[None, :] >= pad_B[:, None]
    keep_BLS = causal_LS & (real_BS[:, None, :] | (key_S[None, :] == slot_L[:, None]))
    return keep_BLS[:, None]


def _check_finite(where: str, t: torch.Tensor) -> None:
    """Debug check (MoGETransformer.check_finite): raise if `t` holds NaN/Inf, naming `where`.

    Costs a reduction and a host sync per call, which is why it is off by default.
    """
    bad = ~torch.isfinite(t)
    if bool(bad.any()):
        n_nan = int(torch.isnan(t).sum())
        raise ValueError(
            f"{where}: {int(bad.sum())} non-finite values ({n_nan} NaN) in an output of shape "
            f"{tuple(t.shape)}; the first non-finite activations of this forward (check_finite=True)"
        )


class Block(nn.Module):
    """Pre-norm block: x + attn(norm(x)), then x + ffn(norm(x)); ffn is MoGE or dense."""

    def __init__(self, cfg: ModelConfig, moe_cfg: MoGEConfig, index: int) -> None:
        super().__init__()
        self.index = index
        self.attn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.attn = Attention(cfg)
        self.ffn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.ffn: nn.Module
        if cfg.is_moe_layer(index):
            self.ffn = MoGELayer(moe_cfg)
        else:
            self.ffn = SwiGLU(cfg.d_model, cfg.resolved_dense_hidden)
        # attention_half through torch.compile, for training steps (moge.model.compiled).
        self.compiled_attention: Callable | None = None

    def attention_half(
        self, x_BLD: torch.Tensor, rope: RotaryEmbedding, cache: KVCache | None, check_finite: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(x + attn(attn_norm(x)), ffn_norm of that): the block up to its FFN."""
        a_BLD = self.attn_norm(x_BLD)
        if check_finite:
            _check_finite(f"blocks.{self.index}.attn_norm", a_BLD)
        # Without a cache the layer index is not read, so one compiled graph serves every block.
        x_BLD = x_BLD + self.attn(a_BLD, rope, cache, self.index if cache is not None else 0)
        if check_finite:
            _check_finite(f"blocks.{self.index}.attn", x_BLD)
        h_BLD = self.ffn_norm(x_BLD)
        if check_finite:
            _check_finite(f"blocks.{self.index}.ffn_norm", h_BLD)
        return x_BLD, h_BLD

    def _compiled_step(self, cache: KVCache | None, check_finite: bool) -> bool:
        """Whether the compiled attention half runs: a training step (grad, no cache, no checks)."""
        return (
            self.compiled_attention is not None
            and cache is None
            and not check_finite
            and self.training
            and torch.is_grad_enabled()
        )

    def forward(
        self,
        x_BLD: torch.Tensor,
        tokens_BL: torch.Tensor,
        rope: RotaryEmbedding,
        cache: KVCache | None,
        check_finite: bool = False,
        domains_BL: torch.Tensor | None = None,
        mask_BL: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, MoGEOutput | None]:
        """check_finite: raise ValueError at the first sub-module whose output holds NaN/Inf."""
        i = self.index
        if self._compiled_step(cache, check_finite):
            assert self.compiled_attention is not None
            x_BLD, h_BLD = self.compiled_attention(self, x_BLD, rope)
        else:
            x_BLD, h_BLD = self.attention_half(x_BLD, rope, cache, check_finite)
        if isinstance(self.ffn, MoGELayer):
            routed = self.ffn(
                h_BLD, token_ids=tokens_BL, domain_ids=domains_BL, mask=mask_BL
            )  # ids: for the random router
            if check_finite:
                _check_finite(f"blocks.{i}.ffn.router (scores)", routed.scores)
                _check_finite(f"blocks.{i}.ffn (routed + shared experts)", routed.hidden)
            return x_BLD + routed.hidden, routed
        y_BLD = self.ffn(h_BLD)
        if check_finite:
            _check_finite(f"blocks.{i}.ffn (dense)", y_BLD)
        return x_BLD + y_BLD, None


@dataclass
class ModelOutput:
    """logits [B, L, V]; loss = lm_loss + aux_loss (None without targets); routing: one per MoE layer."""

    logits: torch.Tensor
    loss: torch.Tensor | None
    lm_loss: torch.Tensor | None
    aux_loss: torch.Tensor
    routing: list[MoGEOutput]


def _check_ids(name: str, ids_BL: torch.Tensor, vocab_size: int, allow_ignore: bool = False) -> None:
    if not isinstance(ids_BL, torch.Tensor) or ids_BL.dim() != 2:
        shape = tuple(ids_BL.shape) if isinstance(ids_BL, torch.Tensor) else type(ids_BL).__name__
        raise ValueError(f"{name}: expected a 2-D [batch, length] tensor, got {shape}")
    if ids_BL.dtype.is_floating_point or ids_BL.dtype.is_complex or ids_BL.dtype == torch.bool:
        raise ValueError(f"{name}: expected integer token ids, got dtype {ids_BL.dtype}")
    if ids_BL.numel() == 0:
        raise ValueError(f"{name}: empty tensor of shape {tuple(ids_BL.shape)}")
    valid = (ids_BL >= 0) & (ids_BL < vocab_size)
    if allow_ignore:
        valid |= ids_BL == IGNORE_INDEX
    if not bool(valid.all()):
        bad = ids_BL[~valid][0].item()
        raise ValueError(f"{name}: id {bad} is outside the vocabulary [0, {vocab_size})")


def _domains_per_token(domain_ids_B: torch.Tensor, tokens_BL: torch.Tensor) -> torch.Tensor:
    """[B] domain ids -> [B, L], one per token (PanGu-Sigma routes by the sequence's domain)."""
    if not isinstance(domain_ids_B, torch.Tensor) or domain_ids_B.shape != tokens_BL.shape[:1]:
        shape = (
            tuple(domain_ids_B.shape)
            if isinstance(domain_ids_B, torch.Tensor)
            else type(domain_ids_B).__name__
        )
        raise ValueError(f"domain_ids: expected shape ({tokens_BL.shape[0]},), one per sequence, got {shape}")
    return domain_ids_B.to(tokens_BL.device)[:, None].expand_as(tokens_BL)


class MoGETransformer(nn.Module):
    """Token embedding, n_layers pre-norm blocks, final RMSNorm, tied or untied LM head."""

    def __init__(self, model_cfg: ModelConfig, moe_cfg: MoGEConfig) -> None:
        super().__init__()
        if moe_cfg.d_model != model_cfg.d_model:
            raise ValueError(f"moe.d_model: {moe_cfg.d_model} differs from model.d_model={model_cfg.d_model}")
        if moe_cfg.router == "random" and moe_cfg.rre_vocab_size != model_cfg.vocab_size:
            raise ValueError(
                f"moe.rre_vocab_size: {moe_cfg.rre_vocab_size} differs from "
                f"model.vocab_size={model_cfg.vocab_size}"
            )
        self.cfg, self.moe_cfg = model_cfg, moe_cfg
        # Drawn first, so torch.manual_seed(s) before building fixes the init whatever the
        # sub-modules' constructors draw. A meta-device build draws nothing (counting
        # parameters leaves the RNG alone): its init_weights draws the seed.
        self.init_seed = None if torch.get_default_device().type == "meta" else draw_seed()
        self.embed = NormalEmbedding(model_cfg.vocab_size, model_cfg.d_model, model_cfg.init_std)
        self.rope = RotaryEmbedding(model_cfg.resolved_head_dim, model_cfg.max_seq_len, model_cfg.rope_theta)
        self.blocks = nn.ModuleList(Block(model_cfg, moe_cfg, i) for i in range(model_cfg.n_layers))
        self.norm = RMSNorm(model_cfg.d_model, model_cfg.norm_eps)
        # Tied: no second module holding the same tensor (safetensors refuses shared storage).
        self.lm_head = None
        if not model_cfg.tie_embeddings:
            self.lm_head = NormalLinear(model_cfg.d_model, model_cfg.vocab_size, bias=False)
        # Debug switch: forward raises ValueError naming the first sub-module (embed,
        # blocks.i.attn, blocks.i.ffn.router, ...) whose output holds NaN/Inf. Off by
        # default: every check is a reduction plus a host sync.
        self.check_finite = False
        self._set_init_stds()
        # load_state_dict(sd, assign=True) into a meta-device build: the RoPE tables too.
        self.register_load_state_dict_post_hook(_init_meta_buffers_after_load)
        if not self.embed.weight.is_meta:  # on meta: whoever allocates calls init_weights
            self.init_weights()

    def _init_rules(self) -> dict[str, tuple[str, float]]:
        """init_weights' rule per parameter name: ("normal", std) or ("fill", value).

        Matrices ~ N(0, init_std); residual output projections (o_proj, w_down,
        w_down_EFD) get init_std / sqrt(2 n_layers) as in GPT-2, so the residual
        stream's variance does not grow with depth. Biases 0, norms and expert scales 1."""
        std = self.cfg.init_std
        out_std = std / math.sqrt(2 * self.cfg.n_layers)
        norm_params = {id(m.weight) for m in self.modules() if isinstance(m, RMSNorm)}
        rules: dict[str, tuple[str, float]] = {}
        for name, p in self.named_parameters():
            leaf = name.rsplit(".", 1)[-1]
            if id(p) in norm_params or leaf == "expert_scale_E":
                rules[name] = ("fill", 1.0)
            elif leaf == "bias":
                rules[name] = ("fill", 0.0)
            elif p.dim() < 2:
                raise RuntimeError(f"init_weights: no rule for the 1-D parameter {name}")
            elif name.endswith(("o_proj.weight", "w_down.weight")) or leaf == "w_down_EFD":
                rules[name] = ("normal", out_std)
            else:
                rules[name] = ("normal", std)
        return rules

    def _set_init_stds(self) -> None:
        """Give every module that draws a weight the std init_weights draws it with
        (_STD_ATTRS): its own reset_parameters() then draws that distribution, so a
        module-by-module init loop (FSDP's meta-device materialisation) gives this model's
        init (its constants: each module's reset_parameters sets them too)."""
        for name, (kind, std) in self._init_rules().items():
            if kind == "normal":
                owner, _, leaf = name.rpartition(".")
                setattr(self.get_submodule(owner), _STD_ATTRS[leaf], std)

    @torch.no_grad()
    def init_weights(self, seed: int | None = None, locate: Locate | None = None) -> None:
        """The one place weights are initialised; buffers are left alone
        (moge.model.init.init_buffers re-creates them after a meta-device build).

        The rule is _init_rules': matrices ~ N(0, init_std); residual output projections
        (o_proj, w_down, w_down_EFD) get init_std / sqrt(2 n_layers) as in GPT-2, so the
        residual stream's variance does not grow with depth. Biases 0, norms and expert
        scales 1. Each module's own reset_parameters() draws the same distribution (from
        torch's generator, _set_init_stds). The normal values here are counter-based
        (moge.model.init.fill_normal_): each one depends only on (seed, the parameter's
        name, its position in the whole tensor).

        seed None: self.init_seed, drawn from torch's default generator at construction
        (or, after a meta-device build, now).
        locate(name, parameter) -> (the tensor to fill, the whole parameter's shape, its
        offset there), for parameters held in pieces (moge.distributed.parallelize.
        materialize passes one); None: every parameter is whole.
        """
        if seed is None:
            self.init_seed = draw_seed() if self.init_seed is None else self.init_seed
            seed = self.init_seed
        rules = self._init_rules()
        for name, p in self.named_parameters():
            piece, whole, offset = (p, None, None) if locate is None else locate(name, p)
            kind, value = rules[name]
            if kind == "fill":
                piece.fill_(value)
            else:
                fill_normal_(piece, seed, name, value, whole, offset)

    def moe_layers(self) -> Iterator[MoGELayer]:
        """The MoGE layers in depth order (the trainer calls end_step() on each)."""
        for block in self.blocks:
            if isinstance(block.ffn, MoGELayer):
                yield block.ffn

    def save_pretrained(self, path, layout: str, **kwargs):
        """Write the weights in `layout` (pangu, qwen3_moe, qwen2_moe, mixtral, llama, qwen2, moge).

        See moge.interop.save_pretrained (kwargs: dtype, max_shard_bytes); returns the files.
        """
        from moge.interop import save_pretrained  # interop imports this module

        return save_pretrained(self, path, layout=layout, **kwargs)

    def new_cache(self, max_len: int | None = None, pad_B: torch.Tensor | None = None) -> KVCache:
        """An empty KV cache of max_len positions (None: model.max_seq_len); pad_B [B]:
        each row's number of left-padded slots (KVCache; what generate's mask gives)."""
        return KVCache(self.cfg.n_layers, max_len or self.cfg.max_seq_len, pad_B)

    def _check_inputs(
        self, tokens_BL: torch.Tensor, targets_BL: torch.Tensor | None, cache: KVCache | None
    ) -> None:
        _check_ids("tokens", tokens_BL, self.cfg.vocab_size)
        start, L = (cache.pos if cache is not None else 0), tokens_BL.shape[1]
        limit = min(self.cfg.max_seq_len, cache.max_len if cache is not None else self.cfg.max_seq_len)
        if start + L > limit:
            where = f" after {start} cached positions" if start else ""
            raise ValueError(f"tokens: length {L}{where} exceeds the limit of {limit} positions")
        if cache is not None and cache.batch not in (None, tokens_BL.shape[0]):
            raise ValueError(
                f"tokens: batch of {tokens_BL.shape[0]} sequences, but the cache holds {cache.batch}; "
                "a cache continues the sequences it was filled with (model.new_cache() for others)"
            )
        if targets_BL is not None:
            _check_ids("targets", targets_BL, self.cfg.vocab_size, allow_ignore=True)
            if targets_BL.shape != tokens_BL.shape:
                raise ValueError(
                    f"targets: shape {tuple(targets_BL.shape)} differs from tokens {tuple(tokens_BL.shape)}"
                )

    def forward(
        self,
        tokens_BL: torch.Tensor,
        targets_BL: torch.Tensor | None = None,
        *,
        cache: KVCache | None = None,
        domain_ids: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
    ) -> ModelOutput:
        """Logits for tokens [B, L]; with a cache, the tokens continue the cached prefix.

        domain_ids [B]: each sequence's domain, for PanGu-Sigma's two-level router
        (moe.rre_domain_groups); other routers ignore it.
        mask [B, L] bool (False: padding): the MoE layers leave padded tokens out of their
        losses, counts and statistics (MoGELayer's mask). Attention does not read it: pad
        on the right (causal attention: real tokens then never see padding), or on the
        left with a cache from new_cache(pad_B=...), whose attention skips the padding.
        model.activation_checkpointing: blocks run under moge.model.recompute.checkpoint_block
        in training with gradients on and no cache (each token still counted once).
        """
        self._check_inputs(tokens_BL, targets_BL, cache)
        domains_BL = None if domain_ids is None else _domains_per_token(domain_ids, tokens_BL)
        check = self.check_finite
        x_BLD = self.embed(tokens_BL)
        if check:
            _check_finite("embed", x_BLD)
        routing: list[MoGEOutput] = []
        # Not with a cache: the recompute would run after cache.advance and write the keys
        # and values again at the next positions.
        recompute = (
            self.cfg.activation_checkpointing and self.training and torch.is_grad_enabled() and cache is None
        )
        for block in self.blocks:
            run = functools.partial(checkpoint_block, block) if recompute else block
            x_BLD, routed = run(
                x_BLD, tokens_BL, self.rope, cache, check_finite=check, domains_BL=domains_BL, mask_BL=mask
            )
            if routed is not None:
                routing.append(routed)
        # The sum of the layers' aux losses (aux_loss_type "released": one pooled loss).
        aux_loss = total_aux_loss(routing, self.moe_cfg) if routing else torch.zeros((), device=x_BLD.device)
        if cache is not None:
            cache.advance(tokens_BL.shape[1])
        h_BLD = self.norm(x_BLD)
        head_VD = self.embed.weight if self.lm_head is None else self.lm_head.weight
        logits_BLV = F.linear(h_BLD, head_VD)
        if check:
            _check_finite("norm", h_BLD)
            _check_finite("lm_head (logits)", logits_BLV)
        lm_loss = loss = None
        if targets_BL is not None:
            # The mean over the counted targets, as cross_entropy's own mean (bit for bit),
            # but 0 rather than 0/0 = NaN when none counts (a micro-batch of padding only).
            nll_sum = F.cross_entropy(
                rearrange(logits_BLV.float(), "b l v -> (b l) v"),
                rearrange(targets_BL, "b l -> (b l)"),
                ignore_index=IGNORE_INDEX,
                reduction="sum",
            )
            lm_loss = nll_sum / (targets_BL != IGNORE_INDEX).sum().clamp_min(1)
            loss = lm_loss + aux_loss
        return ModelOutput(logits_BLV, loss, lm_loss, aux_loss, routing)

    @torch.no_grad()
    def generate(
        self,
        tokens_BL: torch.Tensor,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_k: int | None = None,
        generator: torch.Generator | None = None,
        domain_ids: torch.Tensor | None = None,
        *,
        mask: torch.Tensor | None = None,
        stop_token: int | None = None,
        top_p: float = 1.0,
    ) -> torch.Tensor:
        """Prompt [B, L] -> [B, L + max_new_tokens]: one prefill, then cached one-token steps.

        temperature 0 is greedy (top_k and top_p are then ignored); otherwise the logits are
        divided by it, top_k keeps only the k likeliest tokens (all when k >= vocab_size,
        ties with the k-th kept) and top_p (0 < top_p <= 1; 1: off) then keeps the nucleus,
        the fewest likeliest tokens whose probabilities sum to >= top_p (sampling_logits).
        max_new_tokens 0 returns a copy of the prompt without running the model.
        domain_ids [B]: as in forward (PanGu-Sigma's two-level router).
        mask [B, L] bool (False: padding) for prompts of different lengths, padded on the
        left (any ids in the padding): each row then gets, greedily, the tokens its prompt
        alone gets (sampling draws from one generator for the whole batch). The output
        keeps the padding: its mask is mask followed by True.
        stop_token: a row stops growing once it emits this id: it is kept, the row's later
        positions repeat it, and the output ends early once every row has stopped
        ([B, L + n], n <= max_new_tokens).
        """
        _check_ids("tokens", tokens_BL, self.cfg.vocab_size)
        pad_B = None if mask is None else _left_padding(mask, tokens_BL)
        top_k = _check_sampling(temperature, top_k, top_p)
        max_new_tokens = self._check_generate_lengths(tokens_BL.shape[1], max_new_tokens)
        stop_token = self._check_stop_token(stop_token)
        if max_new_tokens == 0:  # nothing to sample: the prefill's logits would go unread
            return tokens_BL.clone()
        domains_B = None if domain_ids is None else _domains_per_token(domain_ids, tokens_BL)[:, 0]
        was_training = self.training
        layers = list(self.moe_layers())
        losses = [layer.compute_losses for layer in layers]
        self.eval()
        try:
            for layer in layers:
                layer.compute_losses = False  # nothing here reads the aux losses
            cache = self.new_cache(tokens_BL.shape[1] + max_new_tokens, pad_B)
            # With padding, the MoE layers route only the real tokens (capacity included).
            logits_BV = self._next_logits(tokens_BL, cache, domains_B, None if pad_B is None else mask)
            sample = functools.partial(
                sample_next, temperature=temperature, top_k=top_k, generator=generator, top_p=top_p
            )
            return self._decode(tokens_BL, logits_BV, cache, domains_B, sample, max_new_tokens, stop_token)
        finally:
            for layer, on in zip(layers, losses):
                layer.compute_losses = on
            self.train(was_training)

    def _check_generate_lengths(self, n: int, max_new_tokens: int) -> int:
        """generate's checks of max_new_tokens and of the prompt length n against
        max_seq_len; returns max_new_tokens as an int."""
        count = _integer_or_none(max_new_tokens)
        if count is None or count < 0:
            raise ValueError(f"max_new_tokens: expected an integer >= 0, got {max_new_tokens!r}")
        max_new_tokens = count
        limit = self.cfg.max_seq_len
        if n > limit:  # no max_new_tokens fits: the prompt is what to shorten
            raise ValueError(f"tokens: prompt length {n} exceeds model.max_seq_len={limit}")
        if n + max_new_tokens > limit:
            raise ValueError(
                f"max_new_tokens: prompt {n} + {max_new_tokens} new tokens exceeds "
                f"model.max_seq_len={limit}; at most {limit - n} new tokens fit after this prompt"
            )
        return max_new_tokens

    def _check_stop_token(self, stop_token: int | None) -> int | None:
        """generate's check of stop_token: a token id or None; returns it as an int."""
        V, token = self.cfg.vocab_size, _integer_or_none(stop_token)
        if stop_token is not None and (token is None or not 0 <= token < V):
            raise ValueError(f"stop_token: expected a token id in [0, {V}) or None, got {stop_token!r}")
        return token

    def _decode(
        self,
        tokens_BL: torch.Tensor,
        logits_BV: torch.Tensor,
        cache: KVCache,
        domains_B: torch.Tensor | None,
        sample: Callable[[torch.Tensor], torch.Tensor],
        max_new_tokens: int,
        stop_token: int | None,
    ) -> torch.Tensor:
        """generate's loop after the prefill: prompt [B, L] and its last logits [B, V] ->
        [B, L + n], n <= max_new_tokens; sample(logits [B, V]) -> next ids [B, 1]."""
        out = [tokens_BL]
        stopped_B1 = torch.zeros(tokens_BL.shape[0], 1, dtype=torch.bool, device=tokens_BL.device)
        for step in range(max_new_tokens):
            next_B1 = sample(logits_BV)
            if stop_token is not None:
                next_B1 = next_B1.masked_fill(stopped_B1, stop_token)  # a stopped row repeats it
                stopped_B1 |= next_B1 == stop_token
            out.append(next_B1)
            if step + 1 == max_new_tokens or (stop_token is not None and bool(stopped_B1.all())):
                break
            logits_BV = self._next_logits(next_B1, cache, domains_B)
        return torch.cat(out, dim=1)

    def _next_logits(
        self,
        tokens_BL: torch.Tensor,
        cache: KVCache,
        domains_B: torch.Tensor | None,
        mask_BL: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """generate's step: forward's logits at the last position [B, V] for tokens [B, L]
        that generate has checked, without the checks, the aux loss and the other
        positions' logits."""
        domains_BL = None if domains_B is None else domains_B[:, None].expand_as(tokens_BL)
        check = self.check_finite
        x_BLD = self.embed(tokens_BL)
        if check:
            _check_finite("embed", x_BLD)
        for block in self.blocks:
            x_BLD, _ = block(
                x_BLD, tokens_BL, self.rope, cache, check_finite=check, domains_BL=domains_BL, mask_BL=mask_BL
            )
        cache.advance(tokens_BL.shape[1])
        h_BD = self.norm(x_BLD[:, -1])
        head_VD = self.embed.weight if self.lm_head is None else self.lm_head.weight
        logits_BV = F.linear(h_BD, head_VD)
        if check:
            _check_finite("lm_head (logits)", logits_BV)
        return logits_BV


def _init_meta_buffers_after_load(model: MoGETransformer, incompatible_keys) -> None:
    """load_state_dict post hook: buffers still on meta after a load into a meta-device
    build (the RoPE tables; no state dict carries them) are made on the embedding's device."""
    if not model.embed.weight.is_meta:
        init_meta_buffers(model, model.embed.weight.device)


def _left_padding(mask_BL: torch.Tensor, tokens_BL: torch.Tensor) -> torch.Tensor | None:
    """generate's prompt mask [B, L] -> each row's number of left-padded slots [B]
    (None without any padding); ValueError naming mask unless it is left padding."""
    if not isinstance(mask_BL, torch.Tensor) or mask_BL.dtype != torch.bool:
        got = mask_BL.dtype if isinstance(mask_BL, torch.Tensor) else type(mask_BL).__name__
        raise ValueError(f"mask: expected a bool tensor (False: padding), got {got}")
    if mask_BL.shape != tokens_BL.shape:
        raise ValueError(f"mask: shape {tuple(mask_BL.shape)} differs from tokens {tuple(tokens_BL.shape)}")
    mask_BL = mask_BL.to(tokens_BL.device)
    L = tokens_BL.shape[1]
    pad_B = (~mask_BL).sum(dim=1)
    if bool((pad_B == L).any()):
        row = int((pad_B == L).nonzero()[0])
        raise ValueError(f"mask: row {row} has no real token")
    left_BL = torch.arange(L, device=mask_BL.device)[None, :] >= pad_B[:, None]
    if not torch.equal(left_BL, mask_BL):
        row = int((left_BL != mask_BL).any(dim=1).nonzero()[0])
        raise ValueError(
            f"mask: row {row} is not padding on the left then real tokens (generate appends on the "
            "right, so pad prompts on the left)"
        )
    return pad_B if bool(pad_B.any()) else None


def _integer_or_none(value: object) -> int | None:
    """value as an int when it is an integral number (int, NumPy's integers: anything
    numbers.Integral), else None. bool is an Integral too, and refused: True would pass as 1."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        return None
    return operator.index(value)


def _check_sampling(temperature: float, top_k: int | None, top_p: float) -> int | None:
    """generate's checks of its sampling settings: ValueError naming the bad one; returns
    top_k as an int (or None)."""
    # bool is an int (and a Real): True would pass as temperature 1, top_k 1 or top_p 1.
    if isinstance(temperature, bool) or not isinstance(temperature, numbers.Real):
        raise ValueError(f"temperature: expected a number >= 0, got {temperature!r}")
    if not temperature >= 0:
        raise ValueError(f"temperature: must be >= 0 (0: greedy), got {temperature}")
    k = _integer_or_none(top_k)
    if top_k is not None and (k is None or k < 1):
        raise ValueError(f"top_k: expected an integer >= 1 or None, got {top_k!r}")
    if isinstance(top_p, bool) or not isinstance(top_p, numbers.Real):
        raise ValueError(f"top_p: expected a number in (0, 1], got {top_p!r}")
    if not 0 < top_p <= 1:  # NaN fails too
        raise ValueError(
            f"top_p: must be in (0, 1] (1: off; an empty nucleus would keep no token), got {top_p}"
        )
    return k


def sample_next(
    logits_BV: torch.Tensor,
    temperature: float,
    top_k: int | None,
    generator: torch.Generator | None = None,
    top_p: float = 1.0,
) -> torch.Tensor:
    """Next token ids [B, 1] from last-position logits [B, V] (sampling_logits; temperature
    0: the argmax). Bad settings: generate's ValueErrors (_check_sampling), not a torch
    error or NaN from a library caller's top_k 0 or temperature -1."""
    top_k = _check_sampling(temperature, top_k, top_p)
    if temperature == 0:
        return logits_BV.float().argmax(dim=-1, keepdim=True)
    logits_BV = _warped_logits(logits_BV, temperature, top_k, top_p)
    return torch.multinomial(F.softmax(logits_BV, dim=-1), 1, generator=generator)


def sampling_logits(
    logits_BV: torch.Tensor, temperature: float, top_k: int | None = None, top_p: float = 1.0
) -> torch.Tensor:
    """The float32 logits [B, V] sample_next draws from (softmax of them), temperature > 0:
    logits [B, V] shifted so the best is 0, divided by temperature, then -inf for the
    tokens top_k drops and after it those top_p drops: transformers' order
    (TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper) and the same kept
    tokens, except that a tie at either cut keeps every tied token (_outside_nucleus).
    Bad settings: the ValueErrors of generate (_check_sampling).
    """
    top_k = _check_sampling(temperature, top_k, top_p)
    return _warped_logits(logits_BV, temperature, top_k, top_p)


def _warped_logits(
    logits_BV: torch.Tensor, temperature: float, top_k: int | None, top_p: float
) -> torch.Tensor:
    """sampling_logits of settings _check_sampling passed."""
    logits_BV = logits_BV.float()
    # Shift the best logit to 0 first, so a tiny temperature (1e-45) gives 0 and -inf (greedy
    # in the limit) instead of inf - inf = NaN; below float32's smallest normal number T
    # would round to 0 (0/0 = NaN) and the result is greedy anyway.
    # top_k is chosen on the logits themselves: divided by a huge (inf) temperature they
    # would all round to 0 and tie with the k-th.
    drop_BV = None
    if top_k is not None and top_k < logits_BV.shape[-1]:
        kth_B1 = torch.topk(logits_BV, top_k, dim=-1).values[:, -1:]
        drop_BV = logits_BV < kth_B1
    t = max(temperature, torch.finfo(torch.float32).smallest_normal)
    logits_BV = (logits_BV - logits_BV.max(dim=-1, keepdim=True).values) / t
    if drop_BV is not None:
        logits_BV = logits_BV.masked_fill(drop_BV, float("-inf"))
    if top_p < 1:  # 1: every token is in the nucleus (and sampling draws as without it)
        logits_BV = logits_BV.masked_fill(_outside_nucleus(logits_BV, top_p), float("-inf"))
    return logits_BV


def _outside_nucleus(logits_BV: torch.Tensor, top_p: float) -> torch.Tensor:
    """[B, V] bool, True for the tokens outside the top_p nucleus of softmax(logits [B, V]).

    Computed as transformers' TopPLogitsWarper does, so the same probabilities give the same
    cut: sorted ascending, a token goes when its probability plus all smaller ones sum to
    <= 1 - top_p, and the likeliest one always stays. Unlike it, a token tying with the
    least likely kept one stays too: which of equal tokens an (unstable) sort puts first
    would otherwise decide, as top_k keeps ties with the k-th.
    """
    sorted_BV = logits_BV.sort(dim=-1).values
    cum_BV = sorted_BV.softmax(dim=-1).cumsum(dim=-1)
    # The cumulative sum only grows, so the dropped tokens are a prefix of the sorted order.
    n_drop_B1 = (cum_BV[:, :-1] <= 1 - top_p).sum(dim=-1, keepdim=True)
    return logits_BV < sorted_BV.gather(-1, n_drop_B1)


@dataclass(frozen=True)
class ParamCount:
    total: int
    activated: int  # per token: every parameter except the routed experts it skips


def count_parameters(model_cfg: ModelConfig, moe_cfg: MoGEConfig) -> ParamCount:
    """Parameter counts of the model, built on the meta device (no memory, any size).

    activated: what one token uses, so each MoE layer drops (num_experts - top_k)
    routed experts; embedding and LM head are counted in both.
    Sizes whose tensors torch cannot represent (over 2**63 bytes) raise ValueError.
    """
    try:
        with torch.device("meta"):
            model = MoGETransformer(model_cfg, moe_cfg)
    except (RuntimeError, TypeError, OverflowError) as err:
        # torch reports these as "Storage size calculation overflowed" (RuntimeError) or
        # "Overflow when unpacking long long" (TypeError); anything else is a real bug.
        if "overflow" not in str(err).lower():
            raise
        raise ValueError(
            "model: a weight of this configuration has more elements than torch can represent; "
            "lower model.vocab_size, model.d_model, model.head_dim, model.dense_hidden or "
            "moe.num_experts, moe.expert_hidden, moe.shared_hidden"
        ) from err
    total = sum(p.numel() for p in model.parameters())
    skipped = 0
    for layer in model.moe_layers():
        # Per routed expert: its slices of the stacked weights and its learned scale.
        routed = sum(
            p.numel()
            for name, p in layer.named_parameters()
            if name.startswith("experts.") or name == "expert_scale_E"
        )
        assert routed % moe_cfg.num_experts == 0, "stacked expert weights split evenly"
        skipped += (moe_cfg.num_experts - moe_cfg.top_k) * (routed // moe_cfg.num_experts)
    return ParamCount(total=total, activated=total - skipped)


def format_params(n: int) -> str:
    """71_988_535_296 -> '71.99B', 12_345_678 -> '12.3M', 950 -> '950'."""
    for scale, unit, digits in ((1e12, "T", 2), (1e9, "B", 2), (1e6, "M", 1), (1e3, "K", 1)):
        if round(n / scale, digits) >= 1:
            return f"{n / scale:.{digits}f}{unit}"
    return str(n)
