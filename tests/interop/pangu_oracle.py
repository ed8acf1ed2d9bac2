"""A test oracle for the Pangu Pro MoE layout, written from a reading of the released
modelling code (darren-fzq1/EAQuant, models/pangu_moe/modeling_pangu_moe.py): plain loops
and explicit tensors, no moge code, weights looked up by the released key names.

What it encodes of the released code:
- config.json: hidden_size, num_attention_heads, num_key_value_heads (head = hidden/heads),
  rms_norm_eps, rope_theta, num_experts, num_experts_per_tok, moe_intermediate_size,
  shared_expert_intermediate_size, tie_word_embeddings, attention_dropout (read, must be 0).
- RMSNorm in float32, then weight * normalised (cast back to the input dtype).
- q/k/v/o projections with bias; rotate-half RoPE, inv_freq = theta^(-2i/head); grouped KV heads.
- MoE block: logits = gate(x); p = softmax(logits) in float32; the experts are split into
  num_experts_per_tok contiguous groups and each group contributes its arg-max expert with
  weight p * router_scale[0, e] (no renormalisation); plus the shared expert, unweighted.
  The released block itself hard-codes 8 groups and refuses anything but 64 experts with
  top-8 (check_config); the oracle takes groups = num_experts_per_tok, moge's reading, so
  at other shapes it checks that convention rather than the released code.
- logits = lm_head(norm(h)) in float32.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file


def _weights(path: Path) -> dict[str, torch.Tensor]:
    index = path / "model.safetensors.index.json"
    if index.exists():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    else:
        files = ["model.safetensors"]
    out: dict[str, torch.Tensor] = {}
    for name in files:
        out.update(load_file(str(path / name)))
    return out


class PanguOracle:
    def __init__(self, path: str | Path) -> None:
        path = Path(path)
        self.cfg = json.loads((path / "config.json").read_text())
        self.w = _weights(path)
        c = self.cfg
        assert c["model_type"] == "PanguProMoE" and c["architectures"] == ["PanguProMoEForCausalLM"]
        assert float(c["attention_dropout"]) == 0.0
        self.heads, self.kv = c["num_attention_heads"], c["num_key_value_heads"]
        self.head = c["hidden_size"] // self.heads
        self.eps = c["rms_norm_eps"]
        self.groups = c["num_experts_per_tok"]

    def _norm(self, x, weight):
        x32 = x.float()
        return weight * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype)

    def _linear(self, x, name, bias=True):
        b = self.w[f"{name}.bias"] if bias else None
        return F.linear(x, self.w[f"{name}.weight"], b)

    def _rope(self, x):  # x [B, h, L, C]
        L, C = x.shape[-2], x.shape[-1]
        inv = 1.0 / (self.cfg["rope_theta"] ** (torch.arange(0, C, 2).float() / C))
        ang = torch.outer(torch.arange(L).float(), inv)
        emb = torch.cat((ang, ang), dim=-1)
        half = torch.cat((-x[..., C // 2 :], x[..., : C // 2]), dim=-1)
        return x * emb.cos() + half * emb.sin()

    def _attention(self, x, p):
        B, L, _ = x.shape
        q = self._linear(x, f"{p}.q_proj").view(B, L, self.heads, self.head).transpose(1, 2)
        k = self._linear(x, f"{p}.k_proj").view(B, L, self.kv, self.head).transpose(1, 2)
        v = self._linear(x, f"{p}.v_proj").view(B, L, self.kv, self.head).transpose(1, 2)
        q, k = self._rope(q), self._rope(k)
        rep = self.heads // self.kv
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        scores = q @ k.transpose(2, 3) / math.sqrt(self.head)
        future = torch.triu(torch.ones(L, L, dtype=torch.bool), diagonal=1)
        scores = scores.masked_fill(future, float("-inf"))
        out = torch.softmax(scores.float(), dim=-1).to(q.dtype) @ v
        return self._linear(out.transpose(1, 2).reshape(B, L, -1), f"{p}.o_proj")

    def _mlp(self, x, p):
        gate = self._linear(x, f"{p}.gate_proj", bias=False)
        up = self._linear(x, f"{p}.up_proj", bias=False)
        return self._linear(F.silu(gate) * up, f"{p}.down_proj", bias=False)

    def _moe(self, x, p):
        B, L, D = x.shape
        h = x.reshape(-1, D)
        probs = torch.softmax(F.linear(h, self.w[f"{p}.gate.weight"]).float(), dim=-1)
        E = probs.shape[-1]
        per = E // self.groups
        scale = self.w[f"{p}.router_scale"]
        out = torch.zeros_like(h)
        for t in range(h.shape[0]):
            for g in range(self.groups):
                block = probs[t, g * per : (g + 1) * per]
                e = g * per + int(torch.argmax(block))  # first index on ties, as torch.max
                weight = probs[t, e].to(h.dtype) * scale[0, e]
                out[t] += self._mlp(h[t], f"{p}.experts.{e}") * weight
        out = out + self._mlp(h, f"{p}.shared_expert")
        return out.reshape(B, L, D)

    @torch.no_grad()
    def logits(self, tokens):
        x = self.w["model.embed_tokens.weight"][tokens]
        for i in range(self.cfg["num_hidden_layers"]):
            p = f"model.layers.{i}"
            x = x + self._attention(self._norm(x, self.w[f"{p}.input_layernorm.weight"]), f"{p}.self_attn")
            x = x + self._moe(self._norm(x, self.w[f"{p}.post_attention_layernorm.weight"]), f"{p}.mlp")
        x = self._norm(x, self.w["model.norm.weight"])
        head = self.w.get("lm_head.weight", self.w["model.embed_tokens.weight"])
        return F.linear(x, head).float()


def write_random_checkpoint(path: str | Path, cfg: dict, seed: int = 0) -> None:
    """A Pangu-layout folder with random weights, key names and shapes as the released code."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    D, V = cfg["hidden_size"], cfg["vocab_size"]
    C = D // cfg["num_attention_heads"]
    H, N = cfg["num_attention_heads"] * C, cfg["num_key_value_heads"] * C
    E, F_, S = cfg["num_experts"], cfg["moe_intermediate_size"], cfg["shared_expert_intermediate_size"]
    shapes = {"model.embed_tokens.weight": (V, D), "model.norm.weight": (D,), "lm_head.weight": (V, D)}
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}"
        shapes.update({
            f"{p}.input_layernorm.weight": (D,), f"{p}.post_attention_layernorm.weight": (D,),
            f"{p}.self_attn.q_proj.weight": (H, D), f"{p}.self_attn.q_proj.bias": (H,),
            f"{p}.self_attn.k_proj.weight": (N, D), f"{p}.self_attn.k_proj.bias": (N,),
            f"{p}.self_attn.v_proj.weight": (N, D), f"{p}.self_attn.v_proj.bias": (N,),
            f"{p}.self_attn.o_proj.weight": (D, H), f"{p}.self_attn.o_proj.bias": (D,),
            f"{p}.mlp.gate.weight": (E, D), f"{p}.mlp.router_scale": (1, E),
            f"{p}.mlp.shared_expert.gate_proj.weight": (S, D), f"{p}.mlp.shared_expert.up_proj.weight": (S, D),
            f"{p}.mlp.shared_expert.down_proj.weight": (D, S),
        })  # fmt: skip
        for e in range(E):
            shapes.update({
                f"{p}.mlp.experts.{e}.gate_proj.weight": (F_, D), f"{p}.mlp.experts.{e}.up_proj.weight": (F_, D),
                f"{p}.mlp.experts.{e}.down_proj.weight": (D, F_),
            })  # fmt: skip
    tensors = {}
    for k, s in shapes.items():
        base = 1.0 if k.endswith(("norm.weight", "router_scale")) else 0.0
        tensors[k] = base + 0.3 * torch.randn(s, generator=g)
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    (path / "config.json").write_text(json.dumps(cfg))
