"""moge against transformers itself: load what save_pretrained writes, export what it loads."""

from __future__ import annotations

import json
import re

import pytest
import torch
from hf_cases import LAYOUT_NAMES, VOCAB, hf_class, hf_model
from safetensors.torch import save_file

from moge.interop import from_pretrained, save_pretrained

MOE_LAYOUTS = ("qwen3_moe", "qwen2_moe", "mixtral")


def _tokens(seed: int = 1, B: int = 2, L: int = 9) -> torch.Tensor:
    return torch.randint(0, VOCAB, (B, L), generator=torch.Generator().manual_seed(seed))


def _close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    scale = expected.abs().max().item()
    assert scale > 0.1, "logits far from zero, so the tolerance means something"
    torch.testing.assert_close(actual, expected, atol=1e-5 * scale, rtol=1e-5)


@pytest.fixture(scope="module", params=LAYOUT_NAMES)
def saved(request, tmp_path_factory):
    """(layout, transformers model, its save_pretrained folder)."""
    hf = hf_model(request.param)
    path = tmp_path_factory.mktemp(request.param)
    hf.save_pretrained(path)
    return request.param, hf, path


def test_logits_equal_transformers(saved):
    layout, hf, path = saved
    model, cfg = from_pretrained(path)
    x = _tokens()
    with torch.no_grad():
        _close(model(x).logits, hf(x).logits)
    if layout in MOE_LAYOUTS:
        assert any(True for _ in model.moe_layers())


def test_kv_cache_generate_equals_transformers(saved):
    _, hf, path = saved
    model, _ = from_pretrained(path)
    x = _tokens(seed=2, B=2, L=5)
    n = 6
    out = hf.generate(
        x, max_new_tokens=n, do_sample=False, output_logits=True, return_dict_in_generate=True,
        pad_token_id=0, eos_token_id=None,
    )  # fmt: skip
    assert torch.equal(model.generate(x, n, temperature=0.0), out.sequences)
    # The logits of every cached step: prefill, then one token at a time.
    cache = model.new_cache(x.shape[1] + n)
    with torch.no_grad():
        step_logits = [model(x, cache=cache).logits[:, -1]]
        for t in range(1, n):
            step_logits.append(
                model(out.sequences[:, x.shape[1] + t - 1 : x.shape[1] + t], cache=cache).logits[:, -1]
            )
    for ours, theirs in zip(step_logits, out.logits, strict=True):
        _close(ours, theirs)


def test_left_padded_generate_equals_transformers(saved):
    # transformers' generate with an attention mask is the usual way to decode prompts of
    # different lengths; moge's mask= must agree with it token for token.
    _, hf, path = saved
    model, _ = from_pretrained(path)
    x = _tokens(seed=3, B=3, L=7)
    mask = torch.ones_like(x, dtype=torch.bool)
    mask[0, :4], mask[2, :1] = False, False  # prompts of 3, 7 and 6 tokens
    x = x.masked_fill(~mask, 0)
    n = 5
    theirs = hf.generate(
        x, attention_mask=mask.long(), max_new_tokens=n, do_sample=False, pad_token_id=0, eos_token_id=None
    )
    assert torch.equal(model.generate(x, n, temperature=0.0, mask=mask), theirs)


def test_export_loads_in_transformers(saved, tmp_path):
    layout, _, path = saved
    model, _ = from_pretrained(path)
    with torch.no_grad():  # new weights, so the check is not of the original file
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    save_pretrained(model, tmp_path, layout=layout, max_shard_bytes=40_000)
    assert (tmp_path / "model.safetensors.index.json").exists()
    theirs = hf_class(layout).from_pretrained(tmp_path).eval()
    x = _tokens(seed=3)
    with torch.no_grad():
        _close(theirs(x).logits, model(x).logits)


@pytest.mark.parametrize("shard", [40_000, 1 << 30])
def test_round_trip_is_bit_exact(saved, tmp_path, shard):
    layout, _, path = saved
    model, _ = from_pretrained(path)
    save_pretrained(model, tmp_path, layout=layout, max_shard_bytes=shard)
    again, _ = from_pretrained(tmp_path)
    a, b = model.state_dict(), again.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.mark.parametrize("layout", ["qwen3_moe", "mixtral"])
def test_reads_transformers_stacked_expert_names(layout, tmp_path):
    """transformers 5 keeps experts stacked in memory (mlp.experts.gate_up_proj): read those too."""
    hf = hf_model(layout)
    state = {k: v.contiguous() for k, v in hf.state_dict().items()}
    assert any(k.endswith("mlp.experts.gate_up_proj") for k in state)
    save_file(state, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    (tmp_path / "config.json").write_text(json.dumps(hf.config.to_dict()))
    model, _ = from_pretrained(tmp_path)
    x = _tokens(seed=4)
    with torch.no_grad():
        _close(model(x).logits, hf(x).logits)


def test_wrong_shape_names_the_key(saved, tmp_path):
    layout, hf, path = saved
    cfg = json.loads((path / "config.json").read_text())
    cfg["intermediate_size" if layout in ("llama", "qwen2", "mixtral") else "moe_intermediate_size"] = 8
    for f in path.iterdir():
        (tmp_path / f.name).write_bytes(f.read_bytes())
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(
        ValueError,
        match=r"\.(mlp|block_sparse_moe)\..*(gate_proj|w1)\.weight: expected shape \[8, 32\].*found \[(40|16), 32\]",
    ):
        from_pretrained(tmp_path)


def test_grouped_model_refuses_transformers_layouts(tmp_path):
    model, _ = from_pretrained(_pangu_like(tmp_path / "src"))
    for layout in MOE_LAYOUTS:
        with pytest.raises(ValueError, match="transformers has no MoGE.*--to pangu"):
            save_pretrained(model, tmp_path / layout, layout=layout)
        assert not (tmp_path / layout).exists()


def _pangu_like(path):
    from moge.layer import MoGEConfig
    from moge.model import MoGETransformer
    from moge.model.config import ModelConfig

    m = ModelConfig(
        vocab_size=VOCAB, d_model=32, n_layers=1, n_heads=4, n_kv_heads=2, qkv_bias=True, o_bias=True
    )
    e = MoGEConfig(d_model=32, num_experts=4, num_groups=2, top_k=2, expert_hidden=8, num_shared_experts=1)
    save_pretrained(MoGETransformer(m, e), path, layout="pangu")
    return path


@pytest.mark.parametrize(
    ("layout", "qkv_bias", "o_bias"),
    [("qwen2", False, False), ("llama", True, False), ("llama", False, True)],
)
def test_biases_the_layout_has_and_the_model_lacks_export_as_zeros(tmp_path, layout, qkv_bias, o_bias):
    from moge.interop.hfconfig import dense_moe_placeholder
    from moge.model import MoGETransformer
    from moge.training.config import ModelConfig

    torch.manual_seed(0)
    m = ModelConfig(vocab_size=VOCAB, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, qkv_bias=qkv_bias,
                    o_bias=o_bias, first_dense_layers=2, init_std=0.2)  # fmt: skip
    model = MoGETransformer(m, dense_moe_placeholder(32)).eval()
    save_pretrained(model, tmp_path, layout=layout)
    theirs = hf_class(layout).from_pretrained(tmp_path).eval()
    x = _tokens(seed=5)
    with torch.no_grad():
        _close(theirs(x).logits, model(x).logits)


@pytest.mark.parametrize(("qkv_bias", "o_bias"), [(True, False), (False, True)])
def test_qwen3_moe_exports_the_biases_a_model_lacks_as_zeros(tmp_path, qkv_bias, o_bias):
    """Qwen3-MoE's one attention_bias flag covers q/k/v/o, as Llama's does: a model with
    only some of them exports with zeros for the others and runs in transformers."""
    from moge.layer import MoGEConfig
    from moge.model import MoGETransformer
    from moge.model.config import ModelConfig

    torch.manual_seed(0)
    m = ModelConfig(vocab_size=VOCAB, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, qk_norm=True,
                    qkv_bias=qkv_bias, o_bias=o_bias, init_std=0.2)  # fmt: skip
    e = MoGEConfig(d_model=32, num_experts=4, num_groups=1, top_k=2, expert_hidden=8, router="global",
                   learned_expert_scale=False)  # fmt: skip
    model = MoGETransformer(m, e).eval()
    save_pretrained(model, tmp_path, layout="qwen3_moe")
    theirs = hf_class("qwen3_moe").from_pretrained(tmp_path).eval()
    assert theirs.config.attention_bias
    x = _tokens(seed=5)
    with torch.no_grad():
        _close(theirs(x).logits, model(x).logits)


def test_convert_layout_to_layout_and_to_moge_streams_equal_tensors(saved, tmp_path):
    """Resharding a layout through convert (expert by expert) keeps every tensor; so does a moge run."""
    from safetensors.torch import load_file

    from moge.interop import convert
    from moge.training.checkpoint import load_run

    layout, _, path = saved
    convert(path, tmp_path / "again", to=layout, max_shard_bytes=30_000)
    original = load_file(str(path / "model.safetensors"))
    index = json.loads((tmp_path / "again" / "model.safetensors.index.json").read_text())["weight_map"]
    again = {}
    for name in sorted(set(index.values())):
        again.update(load_file(str(tmp_path / "again" / name)))
    assert original.keys() == again.keys()
    for k, v in original.items():
        assert torch.equal(v, again[k]), k
    convert(path, tmp_path / "run", to="moge")
    model, _, _ = load_run(tmp_path / "run")
    ref, _ = from_pretrained(path)
    for k, v in ref.state_dict().items():
        assert torch.equal(model.state_dict()[k], v), k


def test_class_defaults_are_the_transformers_classes_own():
    """A field config.json leaves out takes the value the layout's own class would."""
    import transformers as T

    from moge.interop.hfconfig import CLASS_DEFAULTS

    classes = {
        "llama": T.LlamaConfig, "qwen2": T.Qwen2Config, "mixtral": T.MixtralConfig,
        "qwen2_moe": T.Qwen2MoeConfig, "qwen3_moe": T.Qwen3MoeConfig,
    }  # fmt: skip
    assert set(classes) == set(LAYOUT_NAMES)
    for layout, cls in classes.items():
        theirs = cls(hidden_size=48, num_attention_heads=6)
        ours = CLASS_DEFAULTS[layout]
        kv = ours["num_key_value_heads"] or 6  # None: as many as the attention heads
        assert (theirs.rms_norm_eps, theirs.num_key_value_heads, theirs.max_position_embeddings) == (
            ours["rms_norm_eps"], kv, ours["max_position_embeddings"]
        ), layout  # fmt: skip
        assert theirs.rope_parameters["rope_theta"] == ours["rope_theta"], layout


def test_a_sparse_config_json_builds_the_model_transformers_builds(tmp_path):
    """Mixtral normalises with eps 1e-5 by default, not the 1e-6 of the other layouts: a
    config.json without rms_norm_eps (or max_position_embeddings) must load as transformers
    loads it. Small hidden states make the eps weigh in the logits."""
    import transformers as T

    torch.manual_seed(0)
    cfg = T.MixtralConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=40, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2,
    )  # fmt: skip
    hf = T.MixtralForCausalLM(cfg).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.normal_(0.0, 0.2)
        hf.model.embed_tokens.weight.mul_(1e-2)  # mean square ~4e-6: eps 1e-5 against 1e-6 shows
    hf.save_pretrained(tmp_path)
    fields = json.loads((tmp_path / "config.json").read_text())
    for key in ("rms_norm_eps", "max_position_embeddings"):
        del fields[key]
    (tmp_path / "config.json").write_text(json.dumps(fields))
    theirs = T.MixtralForCausalLM.from_pretrained(tmp_path).eval()
    model, run = from_pretrained(tmp_path)
    assert (run.model.norm_eps, run.model.max_seq_len) == (1e-5, 131072)
    x = _tokens(seed=3)
    with torch.no_grad():
        _close(model(x).logits, theirs(x).logits)
    # The old fallback (eps 1e-6) builds visibly another function from the same folder.
    (tmp_path / "config.json").write_text(json.dumps({**fields, "rms_norm_eps": 1e-6}))
    other, _ = from_pretrained(tmp_path)
    with torch.no_grad():
        assert not torch.allclose(other(x).logits, theirs(x).logits, atol=1e-3, rtol=0)


def _capacity_model(router: str, shared: int, qk_norm: bool):
    from moge.layer import MoGEConfig
    from moge.model import MoGETransformer
    from moge.model.config import ModelConfig

    m = ModelConfig(vocab_size=VOCAB, d_model=32, n_layers=1, n_heads=4, n_kv_heads=2, qk_norm=qk_norm,
                    qkv_bias=router == "grouped", o_bias=router == "grouped")  # fmt: skip
    e = MoGEConfig(d_model=32, num_experts=4, num_groups=2 if router == "grouped" else 1, top_k=2,
                   expert_hidden=8, num_shared_experts=shared, router=router, learned_expert_scale=False,
                   normalize_weights=router == "global", capacity_factor=1.0)  # fmt: skip
    return MoGETransformer(m, e)


@pytest.mark.parametrize(
    ("layout", "router", "shared", "qk_norm"),
    [("qwen3_moe", "global", 0, True), ("mixtral", "global", 0, False), ("pangu", "grouped", 1, False)],
)
def test_capacity_factor_is_refused_by_every_moe_layout(tmp_path, layout, router, shared, qk_norm):
    """Their blocks never drop a token: a dropping model would export as another function."""
    from moge.interop import convert

    model = _capacity_model(router, shared, qk_norm)
    with pytest.raises(ValueError, match=f"layout {layout}: cannot express capacity_factor 1.0"):
        save_pretrained(model, tmp_path / "out", layout=layout)
    assert not (tmp_path / "out").exists()
    save_pretrained(model, tmp_path / "run", layout="moge")
    with pytest.raises(ValueError, match="capacity_factor"):
        convert(tmp_path / "run", tmp_path / "converted", to=layout)
    assert not (tmp_path / "converted").exists()
    model.moe_cfg.capacity_factor = None  # the same model, dropless: exports
    for layer in model.moe_layers():
        layer.config.capacity_factor = None
    save_pretrained(model, tmp_path / "dropless", layout=layout)


def test_bf16_layout_converts_to_a_readable_moge_run(tmp_path):
    """A bf16 checkpoint (as most released ones are) becomes a float32 run that load_run reads."""
    from moge.interop import convert, load_model

    hf = hf_model("llama").to(torch.bfloat16)
    hf.save_pretrained(tmp_path / "hf")
    convert(tmp_path / "hf", tmp_path / "run", to="moge")
    model, _, _ = load_model(tmp_path / "run")
    ref, _ = from_pretrained(tmp_path / "hf", dtype=None)
    assert next(ref.parameters()).dtype == torch.bfloat16
    save_pretrained(ref, tmp_path / "run2", layout="moge")  # a bf16 moge model: the same run
    again, _, _ = load_model(tmp_path / "run2")
    for k, v in ref.state_dict().items():
        assert model.state_dict()[k].dtype == torch.float32, k
        torch.testing.assert_close(model.state_dict()[k], v.float(), atol=0, rtol=0)
        torch.testing.assert_close(again.state_dict()[k], v.float(), atol=0, rtol=0)


def _with_tokens_and_tokenizer(path):
    """A saved qwen3_moe model whose config names special tokens, with a generation config
    and a (word-level) tokenizer beside it, as a hub checkpoint has."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import GenerationConfig, PreTrainedTokenizerFast

    hf = hf_model("qwen3_moe")
    hf.config.bos_token_id, hf.config.eos_token_id, hf.config.pad_token_id = 1, 2, 0
    hf.generation_config = GenerationConfig(bos_token_id=1, eos_token_id=2, pad_token_id=0, max_new_tokens=7)
    hf.save_pretrained(path)
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, VOCAB)}}
    raw = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=raw, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    tok.save_pretrained(path)
    return hf


def test_token_ids_generation_config_and_tokenizer_travel_through_a_moge_run(tmp_path):
    """layout -> moge run -> layout: transformers reads back the same special tokens,
    generation config and tokenizer (moge's config has no field for them; the run keeps
    them in hf/)."""
    from transformers import AutoConfig, AutoTokenizer, GenerationConfig

    from moge.interop import convert

    _with_tokens_and_tokenizer(tmp_path / "src")
    convert(tmp_path / "src", tmp_path / "run", to="moge")
    assert (tmp_path / "run" / "hf" / "generation_config.json").is_file()
    convert(tmp_path / "run", tmp_path / "back", to="qwen3_moe")
    convert(tmp_path / "src", tmp_path / "direct", to="qwen3_moe")
    for out in ("back", "direct"):
        config = AutoConfig.from_pretrained(tmp_path / out)
        assert (config.bos_token_id, config.eos_token_id, config.pad_token_id) == (1, 2, 0), out
        gen = GenerationConfig.from_pretrained(tmp_path / out)
        assert (gen.bos_token_id, gen.eos_token_id, gen.pad_token_id, gen.max_new_tokens) == (1, 2, 0, 7), out
        tok = AutoTokenizer.from_pretrained(tmp_path / out)
        assert tok("w5 w7 w3")["input_ids"] == [5, 7, 3] and tok.eos_token_id == 2, out


def test_named_chat_templates_travel_through_a_moge_run(tmp_path):
    """transformers saves a tokenizer's chat templates other than the default in
    additional_chat_templates/<name>.jinja; they go along with chat_template.jinja."""
    from transformers import AutoTokenizer

    from moge.interop import convert

    _with_tokens_and_tokenizer(tmp_path / "src")
    tok = AutoTokenizer.from_pretrained(tmp_path / "src")
    templates = {"default": "{{ messages[0]['content'] }}", "tool_use": "T {{ messages[0]['content'] }}"}
    tok.chat_template = templates
    tok.save_pretrained(tmp_path / "src")
    assert (tmp_path / "src" / "additional_chat_templates" / "tool_use.jinja").is_file()
    (tmp_path / "src" / "additional_chat_templates" / "notes.txt").write_text("not a template")
    convert(tmp_path / "src", tmp_path / "run", to="moge")
    convert(tmp_path / "run", tmp_path / "back", to="qwen3_moe")
    assert AutoTokenizer.from_pretrained(tmp_path / "back").chat_template == templates
    assert [p.name for p in (tmp_path / "back" / "additional_chat_templates").iterdir()] == ["tool_use.jinja"]


def test_a_layout_without_side_files_converts_without_them(saved, tmp_path):
    """Nothing is invented: no token ids in, none out; no side files, no hf/ folder."""
    import shutil

    from moge.interop import convert
    from moge.interop.sidefiles import TOKEN_FIELDS

    layout, _, path = saved
    bare = tmp_path / "bare"
    bare.mkdir()
    shutil.copyfile(path / "model.safetensors", bare / "model.safetensors")
    config = {
        k: v for k, v in json.loads((path / "config.json").read_text()).items() if k not in TOKEN_FIELDS
    }
    (bare / "config.json").write_text(json.dumps(config))
    convert(bare, tmp_path / "run", to="moge")
    assert not (tmp_path / "run" / "hf").exists()
    convert(tmp_path / "run", tmp_path / "back", to=layout)
    assert sorted(p.name for p in (tmp_path / "back").iterdir()) == ["config.json", "model.safetensors"]
    assert not set(TOKEN_FIELDS) & set(json.loads((tmp_path / "back" / "config.json").read_text()))


def _wide_moe(layout: str) -> torch.nn.Module:
    """A one-block transformers MoE model of `layout`, wide enough (D = 256, 64 experts,
    top-8) that bf16 rounding of the router logits changes some tokens' top-k."""
    import transformers as T

    sizes = dict(
        vocab_size=VOCAB, hidden_size=256, intermediate_size=40, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, num_experts_per_tok=8,
    )  # fmt: skip
    moe = dict(num_experts=64, moe_intermediate_size=8)
    cls, cfg = {
        "qwen3_moe": (T.Qwen3MoeForCausalLM, lambda: T.Qwen3MoeConfig(**sizes, **moe)),
        "qwen2_moe": (
            T.Qwen2MoeForCausalLM,
            lambda: T.Qwen2MoeConfig(**sizes, **moe, shared_expert_intermediate_size=24),
        ),
        "mixtral": (T.MixtralForCausalLM, lambda: T.MixtralConfig(**sizes, num_local_experts=64)),
    }[layout]
    torch.manual_seed(0)
    model = cls(cfg()).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.2)
    return model


@pytest.mark.parametrize("layout", MOE_LAYOUTS)
def test_bf16_import_routes_as_the_transformers_gate(layout, tmp_path):
    """transformers' MoE gates compute their logits in the model's dtype (softmax in
    float32). Read in bf16, the imported layer takes the experts and the gates of that
    gate exactly, on every token without a tie at the k-th place (a tie in bf16 logits is
    torch.topk's to break); float32 logits give gates up to ~5% off."""
    hf = _wide_moe(layout).to(torch.bfloat16)
    hf.save_pretrained(tmp_path)
    model, cfg = from_pretrained(tmp_path, dtype=None)
    assert cfg.moe.router_dtype == "input"
    layer, gate = model.blocks[0].ffn, hf.model.layers[0].mlp.gate
    h = torch.randn(4096, 256, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)

    def sorted_choice(ids, gates):
        ids, order = ids.sort(dim=-1)
        return ids[untied], gates.gather(1, order)[untied].float()

    with torch.no_grad():
        logits, gates, ids = gate(h)
        probs = torch.softmax(logits.float(), dim=-1).sort(dim=-1, descending=True).values
        untied = probs[:, 7] != probs[:, 8]
        assert untied.float().mean() > 0.9
        theirs_ids, theirs_gates = sorted_choice(ids, gates)
        out = layer(h)
        ours_ids, ours_gates = sorted_choice(out.expert_ids, out.weights.to(gates.dtype))
        assert torch.equal(ours_ids, theirs_ids)
        torch.testing.assert_close(ours_gates, theirs_gates, atol=0, rtol=0)
        layer.config.router_dtype = "float32"  # the teeth: float32 logits give other gates
        out = layer(h)
        _, float32_gates = sorted_choice(out.expert_ids, out.weights.to(gates.dtype))
    assert ((float32_gates - theirs_gates).abs() / theirs_gates).max() > 0.01


def _llama_with_rope(path, **fields):
    """A saved tiny Llama whose config.json gets `fields` on top."""
    hf_model("llama").save_pretrained(path)
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, **fields}))


@pytest.mark.parametrize(
    "fields",
    [
        # The legacy `type` key inside rope_parameters: transformers reads it as the kind.
        {"rope_parameters": {"type": "linear", "factor": 4.0, "rope_theta": 10000.0}},
        # A legacy rope_scaling replaces rope_parameters whole in transformers.
        {"rope_parameters": {"rope_type": "default", "rope_theta": 10000.0},
         "rope_scaling": {"rope_type": "linear", "factor": 4.0}},
    ],
)  # fmt: skip
def test_rope_scaling_transformers_applies_is_refused(tmp_path, fields):
    """Either spelling makes transformers scale the RoPE positions; moge refuses, naming it."""
    _llama_with_rope(tmp_path, **fields)
    assert hf_class("llama").from_pretrained(tmp_path).config.rope_parameters["rope_type"] == "linear"
    with pytest.raises(ValueError, match=r"config\.json: rope_(parameters|scaling): rope_type 'linear'"):
        from_pretrained(tmp_path)


@pytest.mark.parametrize("field", ["rope_parameters", "rope_scaling"])
@pytest.mark.parametrize("value", ["default", [10000.0]])
def test_rope_fields_that_are_not_objects_are_named(field, value):
    from moge.interop.hfconfig import rope_theta

    with pytest.raises(ValueError, match=rf"^c\.json: {field}: expected an object, got .* \((str|list)\)$"):
        rope_theta({field: value, "rope_theta": 1e4}, "c.json")


def test_rope_theta_is_taken_where_transformers_takes_it(tmp_path):
    """A plain rope_scaling replaces rope_parameters, its theta included: theta 50, not 1e4."""
    _llama_with_rope(tmp_path, rope_scaling={"rope_type": "default", "rope_theta": 50.0})
    theirs = hf_class("llama").from_pretrained(tmp_path).eval()
    model, cfg = from_pretrained(tmp_path)
    assert cfg.model.rope_theta == theirs.config.rope_parameters["rope_theta"] == 50.0
    x = _tokens(seed=6)
    with torch.no_grad():
        _close(model(x).logits, theirs(x).logits)


def test_llama_export_refuses_a_width_transformers_refuses(tmp_path):
    """LlamaConfig validates hidden_size % num_attention_heads == 0 even when head_dim is
    set: such a model is refused before anything is written, not exported unloadable."""
    import transformers as T

    from moge.interop.hfconfig import dense_moe_placeholder
    from moge.model import MoGETransformer
    from moge.model.config import ModelConfig

    with pytest.raises(
        Exception, match="multiple of the number of attention heads"
    ):  # a strict-dataclass error
        T.LlamaConfig(hidden_size=30, num_attention_heads=4, head_dim=8)
    m = ModelConfig(
        vocab_size=VOCAB, d_model=30, n_layers=1, n_heads=4, n_kv_heads=2, head_dim=8, first_dense_layers=1
    )
    model = MoGETransformer(m, dense_moe_placeholder(30))
    with pytest.raises(ValueError, match="layout llama: cannot express d_model 30 with 4 heads"):
        save_pretrained(model, tmp_path / "out", layout="llama")
    assert not (tmp_path / "out").exists()


def test_qwen2_export_keeps_a_head_dim_other_than_hidden_over_heads(tmp_path):
    """Qwen2Attention reads config.head_dim when config.json has one (Qwen2Config has no
    such field, but keeps it): a model with head_dim 16 at d_model 32, 4 heads exports and
    runs in transformers with its logits, and reads back with the same head size."""
    from moge.interop.hfconfig import dense_moe_placeholder
    from moge.model import MoGETransformer
    from moge.model.config import ModelConfig

    torch.manual_seed(0)
    m = ModelConfig(vocab_size=VOCAB, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16, qkv_bias=True,
                    first_dense_layers=2, init_std=0.2)  # fmt: skip
    model = MoGETransformer(m, dense_moe_placeholder(32)).eval()
    save_pretrained(model, tmp_path, layout="qwen2")
    theirs = hf_class("qwen2").from_pretrained(tmp_path).eval()
    assert theirs.model.layers[0].self_attn.head_dim == 16
    x = _tokens(seed=7)
    with torch.no_grad():
        _close(theirs(x).logits, model(x).logits)
    _, cfg = from_pretrained(tmp_path)
    assert cfg.model.resolved_head_dim == 16


def test_hidden_act_swish_is_silu(tmp_path):
    """transformers' ACT2FN maps "swish" to SiLU too: such a config.json loads with its logits."""
    _llama_with_rope(tmp_path, hidden_act="swish")
    theirs = hf_class("llama").from_pretrained(tmp_path).eval()
    model, _ = from_pretrained(tmp_path)
    x = _tokens(seed=8)
    with torch.no_grad():
        _close(model(x).logits, theirs(x).logits)


@pytest.mark.parametrize(
    ("value", "message"),
    [(None, "config.json lacks the field 'shared_expert_intermediate_size'"), (0, "must be > 0")],
)
def test_a_qwen2_moe_shared_width_that_is_missing_or_zero_is_named(value, message):
    from moge.interop.qwen_moe import Qwen2MoeLayout

    hf = {
        "model_type": "qwen2_moe", "vocab_size": VOCAB, "hidden_size": 16, "num_hidden_layers": 1,
        "num_attention_heads": 2, "num_key_value_heads": 2, "intermediate_size": 32, "num_experts": 4,
        "num_experts_per_tok": 2, "moe_intermediate_size": 8,
    }  # fmt: skip
    if value is not None:
        hf["shared_expert_intermediate_size"] = value
    with pytest.raises(ValueError, match=message):
        Qwen2MoeLayout().read_config(hf, "config.json")
    _, moe = Qwen2MoeLayout().read_config({**hf, "shared_expert_intermediate_size": 24}, "config.json")
    assert moe.shared_width == 24  # the rest of the config reads


@pytest.mark.parametrize("layout", MOE_LAYOUTS)
@pytest.mark.parametrize("value", [None, "0.001", -0.1])
def test_router_aux_loss_coef_null_reads_as_left_out_and_a_bad_one_is_named(layout, value):
    from moge.interop import LAYOUTS

    hf = {k: v for k, v in hf_model(layout).config.to_dict().items() if k != "router_aux_loss_coef"}
    read = LAYOUTS[layout].read_config
    if value is None:
        assert read({**hf, "router_aux_loss_coef": None}, "config.json") == read(hf, "config.json")
    else:
        with pytest.raises(ValueError, match=r"^config\.json: router_aux_loss_coef: "):
            read({**hf, "router_aux_loss_coef": value}, "config.json")


@pytest.mark.parametrize("field", ["num_local_experts", "intermediate_size"])
def test_a_missing_mixtral_field_names_the_file_once(field):
    from moge.interop.mixtral import MixtralLayout

    hf = {k: v for k, v in hf_model("mixtral").config.to_dict().items() if k != field}
    with pytest.raises(ValueError) as err:
        MixtralLayout().read_config(hf, "/m/config.json")
    assert str(err.value) == f"/m/config.json: config.json lacks the field {field!r}"


def test_an_export_over_an_earlier_one_is_what_transformers_loads(tmp_path):
    """transformers reads model.safetensors before an index: a sharded export written where
    a single-file one was must not leave that file behind (transformers would load the old
    weights); shards of an earlier sharding that the new index does not name go too."""
    from moge.interop.hfconfig import dense_moe_placeholder
    from moge.model import MoGETransformer
    from moge.model.config import ModelConfig

    m = ModelConfig(vocab_size=VOCAB, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, first_dense_layers=2,
                    init_std=0.2)  # fmt: skip
    models = []
    for seed in range(3):
        torch.manual_seed(seed)
        models.append(MoGETransformer(m, dense_moe_placeholder(32)).eval())
    x = _tokens(seed=9)
    for model, shard in zip(models, [1 << 30, 20_000, 40_000], strict=True):
        written = save_pretrained(model, tmp_path, layout="llama", max_shard_bytes=shard)
        theirs = hf_class("llama").from_pretrained(tmp_path).eval()
        with torch.no_grad():
            _close(theirs(x).logits, model(x).logits)
        assert sorted(p.name for p in tmp_path.glob("*.safetensors")) == sorted(p.name for p in written)


def test_a_folder_with_a_single_file_and_an_index_reads_as_transformers_reads_it(tmp_path):
    """transformers' own save_pretrained, sharded over a single-file save, leaves both
    model.safetensors and an index; its from_pretrained then reads model.safetensors, and
    so must moge (the index's shards are another model)."""
    first, second = hf_model("llama", seed=0), hf_model("llama", seed=1)
    first.save_pretrained(tmp_path)
    second.save_pretrained(tmp_path, max_shard_size="20KB")
    assert (tmp_path / "model.safetensors").is_file()
    assert (tmp_path / "model.safetensors.index.json").is_file()
    theirs = hf_class("llama").from_pretrained(tmp_path).eval()
    model, _ = from_pretrained(tmp_path)
    x = _tokens(seed=10)
    with torch.no_grad():
        _close(model(x).logits, theirs(x).logits)


def test_a_tied_config_whose_checkpoint_stores_another_head_reads_untied(tmp_path):
    """transformers 5 ties the head to the embedding only when the checkpoint stores no
    lm_head.weight or the same values: one of other values is kept as an untied head (it
    warns). moge reads the same model, and convert keeps that head."""
    from safetensors.torch import load_file

    from moge.interop import convert

    hf_model("qwen2").save_pretrained(tmp_path / "src")  # tie_word_embeddings true: no head stored
    state = load_file(str(tmp_path / "src" / "model.safetensors"))
    assert "lm_head.weight" not in state
    state["lm_head.weight"] = torch.randn(
        state["model.embed_tokens.weight"].shape, generator=torch.Generator().manual_seed(0)
    )
    save_file(state, str(tmp_path / "src" / "model.safetensors"), metadata={"format": "pt"})
    theirs = hf_class("qwen2").from_pretrained(tmp_path / "src").eval()
    assert torch.equal(theirs.lm_head.weight, state["lm_head.weight"])
    model, cfg = from_pretrained(tmp_path / "src")
    assert not cfg.model.tie_embeddings
    x = _tokens(seed=11)
    with torch.no_grad():
        _close(model(x).logits, theirs(x).logits)
    convert(tmp_path / "src", tmp_path / "out", to="qwen2")
    again = hf_class("qwen2").from_pretrained(tmp_path / "out").eval()
    with torch.no_grad():
        _close(again(x).logits, theirs(x).logits)
    # The same head stored beside a tied config is the tied model, as before.
    state["lm_head.weight"] = state["model.embed_tokens.weight"].clone()
    save_file(state, str(tmp_path / "src" / "model.safetensors"), metadata={"format": "pt"})
    assert from_pretrained(tmp_path / "src")[1].model.tie_embeddings


# Every integer field a transformers layout's reader takes (those its config.json holds).
INT_FIELDS = (
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "head_dim", "max_position_embeddings", "num_experts", "num_local_experts",
    "num_experts_per_tok", "moe_intermediate_size", "shared_expert_intermediate_size", "decoder_sparse_step",
)  # fmt: skip


def _int_fields(hf: dict) -> list[str]:
    return [k for k in INT_FIELDS if hf.get(k) is not None]


@pytest.mark.parametrize("layout", LAYOUT_NAMES)
@pytest.mark.parametrize("bad", [128.7, "16", True])
def test_a_size_that_is_not_an_integer_is_named(layout, bad):
    """int() read 128.7 as 128 (another model than the file's) and "16" as a TypeError:
    each integer field refuses a fraction, a string and a bool, naming file, field, value."""
    from moge.interop import LAYOUTS

    hf = hf_model(layout).config.to_dict()
    fields = _int_fields(hf)
    assert len(fields) >= 7, fields
    for field in fields:
        with pytest.raises(ValueError) as err:
            LAYOUTS[layout].read_config({**hf, field: bad}, "/m/config.json")
        assert str(err.value) == (
            f"/m/config.json: {field}: expected an integer, got {bad!r} ({type(bad).__name__})"
        ), field


@pytest.mark.parametrize("layout", LAYOUT_NAMES)
def test_integral_float_sizes_read_as_their_integers(layout):
    """128.0 is the integer 128 (some converters write sizes as floats), in every field
    and in mlp_only_layers' entries."""
    from moge.interop import LAYOUTS

    hf = hf_model(layout).config.to_dict()
    floats = {k: float(hf[k]) for k in _int_fields(hf)}
    if hf.get("mlp_only_layers"):
        floats["mlp_only_layers"] = [float(i) for i in hf["mlp_only_layers"]]
    read = LAYOUTS[layout].read_config
    assert read({**hf, **floats}, "config.json") == read(hf, "config.json")


def test_a_dense_layer_index_that_is_not_an_integer_is_named():
    from moge.interop import LAYOUTS

    hf = hf_model("qwen3_moe").config.to_dict()
    with pytest.raises(ValueError, match=r"^/m/config\.json: mlp_only_layers: expected an integer, got 0\.5"):
        LAYOUTS["qwen3_moe"].read_config({**hf, "mlp_only_layers": [0.5]}, "/m/config.json")


def _model_lacking_biases(layout: str):
    """A moge model of `layout` without some of the biases the layout always has."""
    from moge.interop.hfconfig import dense_moe_placeholder
    from moge.layer import MoGEConfig
    from moge.model import MoGETransformer
    from moge.model.config import ModelConfig

    torch.manual_seed(0)
    dense = layout in ("llama", "qwen2")
    m = ModelConfig(vocab_size=VOCAB, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, qk_norm=not dense,
                    o_bias=layout != "qwen2", first_dense_layers=2 if dense else 0, init_std=0.2)  # fmt: skip
    e = MoGEConfig(d_model=32, num_experts=4, num_groups=1, top_k=2, expert_hidden=8, router="global")
    return MoGETransformer(m, dense_moe_placeholder(32) if dense else e).eval()


@pytest.mark.parametrize("layout", ["qwen2", "llama", "qwen3_moe"])
def test_a_bf16_export_writes_every_tensor_in_bf16(layout, tmp_path):
    """The zero biases a layout has and the model lacks were written in float32 beside the
    model's bf16 tensors. Now every tensor is bf16, and transformers, which casts a mixed
    file to one dtype on load, gives moge's bf16 logits."""
    from safetensors import safe_open

    model = _model_lacking_biases(layout)
    x = _tokens(seed=12)
    with torch.no_grad():
        ref = model(x).logits
    model = model.to(torch.bfloat16)
    save_pretrained(model, tmp_path, layout=layout)
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        dtypes = {k: f.get_slice(k).get_dtype() for k in f.keys()}  # noqa: SIM118 -- safe_open has no iteration
    assert any(k.endswith("_proj.bias") for k in dtypes)
    assert set(dtypes.values()) == {"BF16"}, {k: d for k, d in dtypes.items() if d != "BF16"}
    with torch.no_grad():
        ours = model(x).logits.float()
        bf16_error = (ours - ref).abs().max().item()  # moge's own bf16 rounding of the float32 model
        for dtype in ("auto", torch.bfloat16):
            theirs = hf_class(layout).from_pretrained(tmp_path, dtype=dtype).eval()
            assert {p.dtype for p in theirs.parameters()} == {torch.bfloat16}
            torch.testing.assert_close(theirs(x).logits.float(), ours, atol=2 * bf16_error, rtol=0)


def _moge_of(layout: str, tmp_path, **moe):
    """(moge model read from a transformers `layout` model, with MoGEConfig fields `moe` changed)."""
    import dataclasses

    from moge.model import MoGETransformer

    hf_model(layout).save_pretrained(tmp_path / "hf")
    read, run = from_pretrained(tmp_path / "hf")
    model = MoGETransformer(run.model, dataclasses.replace(run.moe, **moe)).eval()
    model.load_state_dict(read.state_dict())
    return model


@pytest.mark.parametrize("layout", MOE_LAYOUTS)
def test_z_loss_coef_survives_a_round_trip_through_a_layout(layout, tmp_path):
    """No transformers MoE config has a router z-loss field: moge_z_loss_coef keeps it,
    transformers loads the folder as before, and moge, a moge run and convert read it back."""
    from moge.interop import convert

    key = "moge_z_loss_coef"
    model = _moge_of(layout, tmp_path, z_loss_coef=0.003)
    save_pretrained(model, tmp_path / "out", layout=layout)
    assert json.loads((tmp_path / "out" / "config.json").read_text())[key] == 0.003
    _, run = from_pretrained(tmp_path / "out")
    assert run.moe == model.moe_cfg
    theirs = hf_class(layout).from_pretrained(tmp_path / "out").eval()
    x = _tokens(seed=13)
    with torch.no_grad():
        _close(theirs(x).logits, model(x).logits)
    convert(tmp_path / "out", tmp_path / "run", to="moge")
    convert(tmp_path / "run", tmp_path / "back", to=layout)
    assert from_pretrained(tmp_path / "back")[1].moe.z_loss_coef == 0.003
    save_pretrained(_moge_of(layout, tmp_path / "off"), tmp_path / "off" / "out", layout=layout)
    assert key not in json.loads((tmp_path / "off" / "out" / "config.json").read_text())


@pytest.mark.parametrize("value", ["0.1", -0.1, True])
def test_a_bad_z_loss_coef_is_named(value):
    from moge.interop import LAYOUTS

    hf = hf_model("qwen3_moe").config.to_dict()
    with pytest.raises(ValueError, match=r"^/m/config\.json: moge_z_loss_coef: "):
        LAYOUTS["qwen3_moe"].read_config({**hf, "moge_z_loss_coef": value}, "/m/config.json")


@pytest.mark.parametrize("layout", MOE_LAYOUTS)
def test_an_export_trained_with_a_balance_loss_fine_tunes_with_it_in_transformers(layout, tmp_path):
    """transformers adds router_aux_loss_coef * aux_loss to a forward's loss with labels
    only when output_router_logits is set: exported false, fine-tuning there silently
    dropped the balance loss. Set, the loss is moge's: cross-entropy + moge's aux loss."""
    import torch.nn.functional as F

    model = _moge_of(layout, tmp_path, aux_loss_coef=0.05)
    save_pretrained(model, tmp_path / "out", layout=layout)
    theirs = hf_class(layout).from_pretrained(tmp_path / "out").eval()
    assert theirs.config.output_router_logits
    x = _tokens(seed=14)
    with torch.no_grad():
        out, ours = theirs(x, labels=x), model(x)
        ce = F.cross_entropy(out.logits[:, :-1].flatten(0, 1), x[:, 1:].flatten())
        assert out.aux_loss is not None
        torch.testing.assert_close(out.loss - ce, ours.aux_loss, rtol=1e-4, atol=0)
        assert ours.aux_loss > 1e-3 * ce  # large enough that leaving it out shows
    n = 4  # and inference is unchanged by the flag
    theirs_gen = theirs.generate(x, max_new_tokens=n, do_sample=False, pad_token_id=0, eos_token_id=None)
    assert torch.equal(model.generate(x, n, temperature=0.0), theirs_gen)


@pytest.mark.parametrize("layout", MOE_LAYOUTS)
def test_an_export_without_a_balance_loss_leaves_output_router_logits_off(layout, tmp_path):
    model = _moge_of(layout, tmp_path, aux_loss_coef=0.0)
    save_pretrained(model, tmp_path / "out", layout=layout)
    theirs = hf_class(layout).from_pretrained(tmp_path / "out").eval()
    assert not theirs.config.output_router_logits and theirs.config.router_aux_loss_coef == 0.0
    assert from_pretrained(tmp_path / "out")[1].moe.aux_loss_coef == 0.0


# Every true/false field a transformers layout's reader takes, with its class's default.
BOOL_FIELDS = {
    "tie_word_embeddings": False, "attention_bias": False, "mlp_bias": False, "qkv_bias": True,
    "norm_topk_prob": False, "use_sliding_window": False,
}  # fmt: skip


@pytest.mark.parametrize("layout", LAYOUT_NAMES)
@pytest.mark.parametrize("bad", ["false", "true", 0, 1])
def test_a_flag_that_is_not_true_or_false_is_named(layout, bad):
    """bool() read "false" as true (and 0 / 1 as flags): each true/false field refuses
    anything but JSON true or false, naming file, field, value and type."""
    from moge.interop import LAYOUTS

    hf = hf_model(layout).config.to_dict()
    fields = [k for k in BOOL_FIELDS if k in hf] + ["use_sliding_window"]  # every reader checks that one
    for field in fields:
        with pytest.raises(ValueError) as err:
            LAYOUTS[layout].read_config({**hf, field: bad}, "/m/config.json")
        assert str(err.value) == (
            f"/m/config.json: {field}: expected true or false, got {bad!r} ({type(bad).__name__})"
        ), field


@pytest.mark.parametrize("layout", LAYOUT_NAMES)
def test_a_null_flag_reads_as_left_out(layout):
    """null is the class's default, as a field left out (qkv_bias null was false, not true)."""
    from moge.interop import LAYOUTS

    hf = hf_model(layout).config.to_dict()
    read = LAYOUTS[layout].read_config
    for field in [k for k in BOOL_FIELDS if k in hf]:
        left_out = {k: v for k, v in hf.items() if k != field}
        assert (
            read({**hf, field: None}, "c")
            == read(left_out, "c")
            == read({**hf, field: BOOL_FIELDS[field]}, "c")
        )


def _with_theta(hf: dict, value) -> dict:
    """hf with its rope theta (transformers 5 writes it in rope_parameters) set to value."""
    return {**hf, "rope_parameters": {**hf["rope_parameters"], "rope_theta": value}}


@pytest.mark.parametrize("layout", LAYOUT_NAMES)
@pytest.mark.parametrize("bad", ["1e-6", True, float("nan"), float("inf")])
def test_a_real_number_that_is_not_a_finite_number_is_named(layout, bad):
    """float() took "1e-6" and true (1.0), and NaN / inf went on to a model that computes NaN:
    each real-number field refuses them, naming file, field and value (and type)."""
    from moge.interop import LAYOUTS

    hf = hf_model(layout).config.to_dict()
    cases = {
        k: {**hf, k: bad} for k in ("rms_norm_eps", "initializer_range", "router_aux_loss_coef") if k in hf
    }
    cases["rope_parameters.rope_theta"] = _with_theta(hf, bad)
    for field, config in cases.items():
        with pytest.raises(ValueError) as err:
            LAYOUTS[layout].read_config(config, "/m/config.json")
        if isinstance(bad, float):
            want = f"/m/config.json: {field}: must be finite, got {bad}"
        else:
            want = f"/m/config.json: {field}: expected a number, got {bad!r} ({type(bad).__name__})"
        assert str(err.value) == want, field


@pytest.mark.parametrize("layout", LAYOUT_NAMES)
def test_a_non_positive_eps_theta_or_init_range_is_named(layout):
    from moge.interop import LAYOUTS

    hf = hf_model(layout).config.to_dict()
    read = LAYOUTS[layout].read_config
    for field, config in {
        "rms_norm_eps": {**hf, "rms_norm_eps": 0}, "initializer_range": {**hf, "initializer_range": -0.02},
        "rope_parameters.rope_theta": _with_theta(hf, 0.0), "rope_theta": {**hf, "rope_parameters": None, "rope_theta": -1},
    }.items():  # fmt: skip
        with pytest.raises(ValueError, match=rf"^/m/config\.json: {re.escape(field)}: must be > 0\.0, got "):
            read(config, "/m/config.json")


@pytest.mark.parametrize("layout", LAYOUT_NAMES)
def test_integer_real_numbers_read_as_their_floats(layout):
    """A JSON integer is a number too: rope_theta 10000 is 10000.0."""
    from moge.interop import LAYOUTS

    hf = hf_model(layout).config.to_dict()
    theta = hf["rope_parameters"]["rope_theta"]
    assert theta == int(theta)
    read = LAYOUTS[layout].read_config
    assert read(_with_theta(hf, int(theta)), "c") == read(hf, "c")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_an_export_names_its_dtype_and_loads_in_it_with_dtype_auto(saved, tmp_path, dtype):
    """transformers 5's save_pretrained writes "dtype" ("bfloat16"), transformers 4's
    "torch_dtype"; from_pretrained(dtype="auto") loads the model in it. moge's export wrote
    neither: it names the weights' dtype now, the cast's with --dtype / dtype=."""
    from moge.interop import convert

    layout, _, path = saved
    model, _ = from_pretrained(path)  # float32, from transformers' float32 save
    save_pretrained(model.to(dtype), tmp_path / "as_is", layout=layout)
    save_pretrained(model.float(), tmp_path / "cast", layout=layout, dtype=dtype)
    other = torch.float32 if dtype == torch.bfloat16 else torch.bfloat16
    convert(tmp_path / "cast", tmp_path / "converted", to=layout, dtype=other)  # not the source's field
    for out, want in (("as_is", dtype), ("cast", dtype), ("converted", other)):
        cfg = json.loads((tmp_path / out / "config.json").read_text())
        expected = str(want).removeprefix("torch.")
        assert (cfg["dtype"], cfg["torch_dtype"]) == (expected, expected), out
        theirs = hf_class(layout).from_pretrained(tmp_path / out, dtype="auto")
        assert {p.dtype for p in theirs.parameters()} == {want}, out


def test_the_dtype_fields_are_read_and_left_to_the_tensors():
    """Both keys (transformers 5's dtype, 4's torch_dtype) read as the same model: moge
    takes each tensor's dtype from the safetensors header (from_pretrained's dtype=None)."""
    from moge.interop import LAYOUTS

    hf = hf_model("qwen3_moe").config.to_dict()
    read = LAYOUTS["qwen3_moe"].read_config
    for fields in (
        {"dtype": "bfloat16"},
        {"torch_dtype": "float16"},
        {"dtype": None, "torch_dtype": "bfloat16"},
    ):
        assert read({**hf, **fields}, "c") == read(hf, "c")


@pytest.mark.parametrize("layout", LAYOUT_NAMES)
def test_zero_key_value_heads_is_named(layout):
    """num_key_value_heads 0 read as one per query head (`kv or heads`): transformers
    divides by it (a ZeroDivisionError there), so it is refused as a non-positive count."""
    from moge.interop import LAYOUTS

    hf = hf_model(layout).config.to_dict()
    with pytest.raises(ValueError, match=r"^/m/config\.json: model\.n_kv_heads: must be >= 1, got 0$"):
        LAYOUTS[layout].read_config({**hf, "num_key_value_heads": 0}, "/m/config.json")


@pytest.mark.parametrize("layout", ["qwen3_moe", "qwen2_moe"])
@pytest.mark.parametrize("bad", [0, "0", {"0": 1}, True])
def test_mlp_only_layers_that_is_not_a_list_is_named(layout, bad):
    """An int or bool was a bare TypeError (not iterable); a string or object was taken
    apart into characters / keys. Only a JSON list of layer indices is read."""
    from moge.interop import LAYOUTS

    hf = hf_model(layout).config.to_dict()
    with pytest.raises(ValueError) as err:
        LAYOUTS[layout].read_config({**hf, "mlp_only_layers": bad}, "/m/config.json")
    assert str(err.value) == (
        f"/m/config.json: mlp_only_layers: expected a list of layer indices, got {bad!r} ({type(bad).__name__})"
    )
    read = LAYOUTS[layout].read_config  # null: left out, no dense-only layers
    assert read({**hf, "mlp_only_layers": None}, "c") == read({**hf, "mlp_only_layers": []}, "c")


@pytest.mark.parametrize("layout", ["qwen3_moe", "qwen2_moe"])
@pytest.mark.parametrize("bad", [0, -2])
def test_a_non_positive_decoder_sparse_step_is_named(layout, bad):
    """0 read as 1 (`or 1`: every layer MoE) where transformers divides by it
    (ZeroDivisionError); a negative step is no step either."""
    from moge.interop import LAYOUTS

    hf = hf_model(layout).config.to_dict()
    with pytest.raises(ValueError, match=rf"^/m/config\.json: decoder_sparse_step: must be >= 1, got {bad}$"):
        LAYOUTS[layout].read_config({**hf, "decoder_sparse_step": bad}, "/m/config.json")
    read = LAYOUTS[layout].read_config  # null: left out, the class's 1
    assert read({**hf, "decoder_sparse_step": None}, "c") == read({**hf, "decoder_sparse_step": 1}, "c")
