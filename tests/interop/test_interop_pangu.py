"""The Pangu Pro MoE layout against an oracle read from the released modelling code."""

from __future__ import annotations

import json

import pytest
import torch
from pangu_oracle import PanguOracle, write_random_checkpoint

from moge.interop import from_pretrained, save_pretrained
from moge.layer import MoGEConfig
from moge.model import MoGETransformer
from moge.model.config import ModelConfig

# The released block's own shape (64 experts, top-8, 8 groups), at tiny widths.
RELEASED_FIELDS = dict(
    architectures=["PanguProMoEForCausalLM"], model_type="PanguProMoE", vocab_size=80, hidden_size=32,
    num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, hidden_act="silu",
    max_position_embeddings=64, initializer_range=0.02, rms_norm_eps=1e-5, use_cache=True,
    tie_word_embeddings=False, rope_theta=16000000.0, moe_intermediate_size=4,
    shared_expert_intermediate_size=12, num_experts_per_tok=8, num_experts=64,
    output_router_logits=False, router_aux_loss_coef=0.001, attention_dropout=0.0,
)  # fmt: skip


def _close(actual, expected):
    scale = expected.abs().max().item()
    assert scale > 0.1
    torch.testing.assert_close(actual, expected, atol=1e-5 * scale, rtol=1e-5)


def _tokens(seed=0, B=2, L=7):
    return torch.randint(0, 80, (B, L), generator=torch.Generator().manual_seed(seed))


def _moge_pangu(seed=0) -> MoGETransformer:
    torch.manual_seed(seed)
    m = ModelConfig(vocab_size=80, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, qkv_bias=True, o_bias=True,
                    rope_theta=1.6e7, max_seq_len=64)  # fmt: skip
    e = MoGEConfig(d_model=32, num_experts=64, num_groups=8, top_k=8, expert_hidden=4, num_shared_experts=1,
                   shared_hidden=12, learned_expert_scale=True)  # fmt: skip
    model = MoGETransformer(m, e).eval()
    with torch.no_grad():
        for p in model.parameters():  # biases, norms and expert scales away from 0 / 1 too
            p.add_(0.3 * torch.randn_like(p))
    return model


def test_released_checkpoint_loads_with_equal_logits(tmp_path):
    write_random_checkpoint(tmp_path, RELEASED_FIELDS)
    model, cfg = from_pretrained(tmp_path)
    assert (cfg.moe.router, cfg.moe.num_groups, cfg.moe.top_k) == ("grouped", 8, 8)
    x = _tokens()
    with torch.no_grad():
        _close(model(x).logits, PanguOracle(tmp_path).logits(x))


def test_export_runs_in_the_oracle_with_kv_cache(tmp_path):
    model = _moge_pangu()
    save_pretrained(model, tmp_path, layout="pangu", max_shard_bytes=50_000)
    cfg = json.loads((tmp_path / "config.json").read_text())
    for field, value in RELEASED_FIELDS.items():  # every field the released code reads
        assert field in cfg, field
        if field not in ("router_aux_loss_coef", "output_router_logits", "max_position_embeddings",
                         "initializer_range"):  # fmt: skip
            assert cfg[field] == value, field
    assert cfg["output_router_logits"]  # trained with a balance loss: fine-tuned with it (docs/interop.md)
    oracle = PanguOracle(tmp_path)
    x = _tokens(1, B=2, L=5)
    with torch.no_grad():
        _close(model(x).logits, oracle.logits(x))
    out = model.generate(x, 5, temperature=0.0)
    seq = x
    cache = model.new_cache(10)
    with torch.no_grad():
        step = model(x, cache=cache).logits[:, -1]
        for t in range(5):
            _close(step, oracle.logits(seq)[:, -1])  # the oracle recomputes everything, no cache
            seq = torch.cat([seq, step.argmax(-1, keepdim=True)], dim=1)
            if t < 4:
                step = model(seq[:, -1:], cache=cache).logits[:, -1]
    assert torch.equal(out, seq)


def test_round_trip_bit_exact(tmp_path):
    model = _moge_pangu(1)
    save_pretrained(model, tmp_path, layout="pangu")
    again, _ = from_pretrained(tmp_path)
    for k, v in model.state_dict().items():
        assert torch.equal(v, again.state_dict()[k]), k


def test_model_without_biases_or_scales_exports_zeros_and_ones(tmp_path):
    torch.manual_seed(0)
    m = ModelConfig(vocab_size=80, d_model=32, n_layers=1, n_heads=4, n_kv_heads=2, max_seq_len=64)
    e = MoGEConfig(d_model=32, num_experts=8, num_groups=4, top_k=4, expert_hidden=4, num_shared_experts=2)
    model = MoGETransformer(m, e).eval()
    save_pretrained(model, tmp_path, layout="pangu")
    oracle = PanguOracle(tmp_path)
    assert torch.equal(oracle.w["model.layers.0.self_attn.o_proj.bias"], torch.zeros(32))
    assert torch.equal(oracle.w["model.layers.0.mlp.router_scale"], torch.ones(1, 8))
    x = _tokens(2)
    with torch.no_grad():
        _close(model(x).logits * 10, oracle.logits(x) * 10)  # untrained: small logits


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (dict(router="global"), "global router"),
        (dict(top_k=8, num_groups=4), "one expert per group"),
        (dict(normalize_weights=True), "renormalised"),
        (dict(num_shared_experts=0), "shared expert"),
    ],
)
def test_refuses_what_the_released_code_cannot_express(tmp_path, change, message):
    base = dict(d_model=32, num_experts=8, num_groups=4, top_k=4, expert_hidden=4, num_shared_experts=1)
    m = ModelConfig(vocab_size=80, d_model=32, n_layers=1, n_heads=4, n_kv_heads=2)
    model = MoGETransformer(m, MoGEConfig(**{**base, **change}))
    with pytest.raises(ValueError, match=message):
        save_pretrained(model, tmp_path / "out", layout="pangu")


def test_the_72b_config_exports_the_released_configuration():
    """configs/pangu-pro-moe-72b.yaml -> config.json: the released configuration's defaults."""
    from pathlib import Path

    from moge.interop.pangu import PanguLayout
    from moge.training.config import load_config

    cfg = load_config(Path(__file__).resolve().parents[2] / "configs" / "pangu-pro-moe-72b.yaml")
    written = PanguLayout().write_config(cfg.model, cfg.moe)
    released = dict(
        vocab_size=153376, hidden_size=5120, num_hidden_layers=48, num_attention_heads=40,
        num_key_value_heads=8, hidden_act="silu", initializer_range=0.02, rms_norm_eps=1e-5,
        tie_word_embeddings=False, rope_theta=16000000.0, moe_intermediate_size=1344,
        shared_expert_intermediate_size=5376, num_experts_per_tok=8, num_experts=64,
        router_aux_loss_coef=0.001, model_type="PanguProMoE",
    )  # fmt: skip
    assert {k: written[k] for k in released} == released
    # The release ships output_router_logits false; a model trained with a balance loss
    # exports it true, so that the released code adds that loss when fine-tuning.
    assert written["output_router_logits"] is True
    assert written["max_position_embeddings"] == cfg.model.max_seq_len
    back_model, back_moe = PanguLayout().read_config(written, "config.json")
    # Read back as the released code runs it: router logits in the input's dtype.
    expected = cfg.moe.__class__(**{**cfg.moe.__dict__, "num_shared_experts": 1, "router_dtype": "input"})
    assert back_moe == expected
    assert (back_model.n_heads, back_model.resolved_head_dim, back_model.o_bias) == (40, 128, True)


def test_imported_router_computes_logits_in_the_input_dtype_as_released():
    """The released gate is a Linear in the model's dtype with the softmax in float32. In
    bf16 the imported layer picks exactly the experts of that rule (each group's arg-max,
    first index on ties), where float32 logits pick others for some tokens."""
    from moge.interop.pangu import PanguLayout
    from moge.layer import MoGELayer

    D = 256
    _, e = PanguLayout().read_config({**RELEASED_FIELDS, "hidden_size": D}, "config.json")
    assert e.router_dtype == "input"
    torch.manual_seed(0)
    layer = MoGELayer(e).to(torch.bfloat16).eval()
    h = torch.randn(4096, D).to(torch.bfloat16)
    with torch.no_grad():
        probs = torch.softmax(torch.nn.functional.linear(h, layer.router.weight).float(), dim=-1)
        released = probs.view(-1, 8, 8).argmax(dim=-1) + 8 * torch.arange(8)
        assert torch.equal(layer(h).expert_ids, released)
        layer.config.router_dtype = "float32"
        changed = (layer(h).expert_ids != released).any(dim=1).sum().item()
    assert changed > 0, "float32 logits should change some token's choice: the check above has teeth"


@pytest.mark.parametrize(
    ("value", "message"), [("0.001", "expected a number"), (-0.1, "must be >= 0"), (float("nan"), "finite")]
)
def test_a_bad_router_aux_loss_coef_is_named(value, message):
    from moge.interop.pangu import PanguLayout

    with pytest.raises(ValueError, match=rf"^config\.json: router_aux_loss_coef: .*{message}"):
        PanguLayout().read_config({**RELEASED_FIELDS, "router_aux_loss_coef": value}, "config.json")


def test_a_null_router_aux_loss_coef_reads_as_the_field_left_out():
    """null, as for every other field: the configuration class's default (not a TypeError)."""
    from moge.interop.pangu import PanguLayout

    absent = {k: v for k, v in RELEASED_FIELDS.items() if k != "router_aux_loss_coef"}
    _, null = PanguLayout().read_config({**absent, "router_aux_loss_coef": None}, "config.json")
    _, left_out = PanguLayout().read_config(absent, "config.json")
    assert null == left_out


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (dict(moe_intermediate_size=None), "config.json lacks the field 'moe_intermediate_size'"),
        (dict(shared_expert_intermediate_size=None), "config.json lacks the field 'shared_expert_intermediate_size'"),
        (dict(shared_expert_intermediate_size=0), "shared_hidden: must be >= 1, got 0"),
        (dict(num_experts_per_tok=3), "num_groups: 3 groups do not divide num_experts=64 (groups = num_experts_per_tok"),
    ],
)  # fmt: skip
def test_a_bad_moe_field_is_named_once(change, message):
    """Each error names the file once; the groups hint only where groups are the matter."""
    from moge.interop.pangu import PanguLayout

    with pytest.raises(ValueError) as err:
        PanguLayout().read_config({**RELEASED_FIELDS, **change}, "/m/config.json")
    assert str(err.value).startswith(f"/m/config.json: {message}"), str(err.value)
    assert str(err.value).count("/m/config.json") == 1
    assert ("groups = num_experts_per_tok" in str(err.value)) == ("groups" in message)


def test_the_released_modelling_code_travels_with_the_checkpoint(tmp_path):
    """config.json's auto_map names configuration_pangu_moe.py and modeling_pangu_moe.py
    (what trust_remote_code loads): a released checkpoint converted through a moge run, or
    straight to pangu, keeps them, so that its code still finds them."""
    from moge.interop import convert
    from moge.interop.pangu import AUTO_MAP

    src = tmp_path / "src"
    write_random_checkpoint(src, RELEASED_FIELDS)
    code = {f"{target.split('.')[0]}.py": f"# {target}\n" for target in AUTO_MAP.values()}
    for name, text in code.items():
        (src / name).write_text(text)
    convert(src, tmp_path / "run", to="moge")
    convert(tmp_path / "run", tmp_path / "back", to="pangu")
    convert(src, tmp_path / "direct", to="pangu")
    for out in ("back", "direct"):
        auto_map = json.loads((tmp_path / out / "config.json").read_text())["auto_map"]
        for target in auto_map.values():
            name = f"{target.split('.')[0]}.py"
            assert (tmp_path / out / name).read_text() == code[name], (out, name)


INT_FIELDS = (
    "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
    "max_position_embeddings", "moe_intermediate_size", "shared_expert_intermediate_size",
    "num_experts_per_tok", "num_experts",
)  # fmt: skip


@pytest.mark.parametrize("field", INT_FIELDS)
@pytest.mark.parametrize("bad", [32.5, "32", True])
def test_a_size_that_is_not_an_integer_is_named(field, bad):
    """int() read 32.5 as 32 and "32" as a TypeError; an integral float is its integer."""
    from moge.interop.pangu import PanguLayout

    with pytest.raises(ValueError) as err:
        PanguLayout().read_config({**RELEASED_FIELDS, field: bad}, "/m/config.json")
    assert (
        str(err.value) == f"/m/config.json: {field}: expected an integer, got {bad!r} ({type(bad).__name__})"
    )
    floats = {**RELEASED_FIELDS, field: float(RELEASED_FIELDS[field])}
    assert PanguLayout().read_config(floats, "c") == PanguLayout().read_config(RELEASED_FIELDS, "c")


def test_a_bf16_export_writes_its_zero_biases_and_ones_scale_in_bf16(tmp_path):
    """A model without biases or expert scale exports zeros / ones for them: in the
    model's dtype (they were float32 beside bf16 weights), and it reads back the same."""
    from safetensors import safe_open

    torch.manual_seed(0)
    m = ModelConfig(vocab_size=80, d_model=32, n_layers=1, n_heads=4, n_kv_heads=2, init_std=0.2)
    e = MoGEConfig(d_model=32, num_experts=16, num_groups=4, top_k=4, expert_hidden=4, num_shared_experts=1)
    model = MoGETransformer(m, e).to(torch.bfloat16).eval()
    save_pretrained(model, tmp_path, layout="pangu")
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        dtypes = {k: f.get_slice(k).get_dtype() for k in f.keys()}  # noqa: SIM118 -- safe_open has no iteration
    assert "model.layers.0.mlp.router_scale" in dtypes and "model.layers.0.self_attn.o_proj.bias" in dtypes
    assert set(dtypes.values()) == {"BF16"}, {k: d for k, d in dtypes.items() if d != "BF16"}
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert (cfg["dtype"], cfg["torch_dtype"]) == ("bfloat16", "bfloat16")  # as transformers 5 / 4 write it
    again = from_pretrained(tmp_path, dtype=None)[0].state_dict()
    for k, v in again.items():
        assert v.dtype == torch.bfloat16, k
        if k in model.state_dict():
            assert torch.equal(v, model.state_dict()[k]), k
        else:  # what moge lacks reads back as the constant it stood for
            assert torch.equal(v, torch.full_like(v, 1.0 if k.endswith("expert_scale_E") else 0.0)), k


def test_z_loss_coef_survives_a_round_trip_through_the_layout(tmp_path):
    """The released configuration has no z-loss field: moge_z_loss_coef keeps it."""
    import dataclasses

    from moge.interop.pangu import PanguLayout

    m, e = _moge_pangu().cfg, _moge_pangu().moe_cfg
    model = MoGETransformer(m, dataclasses.replace(e, z_loss_coef=0.002))
    save_pretrained(model, tmp_path, layout="pangu")
    assert json.loads((tmp_path / "config.json").read_text())["moge_z_loss_coef"] == 0.002
    assert from_pretrained(tmp_path)[1].moe.z_loss_coef == 0.002
    assert PanguLayout().read_config(RELEASED_FIELDS, "config.json")[1].z_loss_coef == 0.0  # left out: off


@pytest.mark.parametrize("bad", ["false", 0, 1])
def test_a_flag_that_is_not_true_or_false_is_named(bad):
    """bool() read tie_word_embeddings "false" as true: a tied model the file does not describe."""
    from moge.interop.pangu import PanguLayout

    with pytest.raises(ValueError) as err:
        PanguLayout().read_config({**RELEASED_FIELDS, "tie_word_embeddings": bad}, "/m/config.json")
    assert str(err.value) == (
        f"/m/config.json: tie_word_embeddings: expected true or false, got {bad!r} ({type(bad).__name__})"
    )


@pytest.mark.parametrize("field", ["rms_norm_eps", "rope_theta", "initializer_range", "router_aux_loss_coef"])
@pytest.mark.parametrize("bad", ["1e-5", True, float("nan"), float("inf")])
def test_a_real_number_that_is_not_a_finite_number_is_named(field, bad):
    """float() took "1e-5" and true (1.0); NaN and inf are no eps, theta, std or coefficient."""
    from moge.interop.pangu import PanguLayout

    with pytest.raises(ValueError) as err:
        PanguLayout().read_config({**RELEASED_FIELDS, field: bad}, "/m/config.json")
    want = (
        f"must be finite, got {bad}"
        if isinstance(bad, float)
        else f"expected a number, got {bad!r} ({type(bad).__name__})"
    )
    assert str(err.value) == f"/m/config.json: {field}: {want}"
    ints = {**RELEASED_FIELDS, "rope_theta": 16000000}  # a JSON integer is a number too
    assert PanguLayout().read_config(ints, "c") == PanguLayout().read_config(RELEASED_FIELDS, "c")


@pytest.mark.parametrize("heads", [0, -4])
def test_a_non_positive_head_count_is_named(heads):
    """num_attention_heads 0 was a ZeroDivisionError (hidden_size % heads): now the
    ValueError every other reader gives for it."""
    from moge.interop.pangu import PanguLayout

    with pytest.raises(ValueError, match=rf"^/m/config\.json: model\.n_heads: must be >= 1, got {heads}$"):
        PanguLayout().read_config({**RELEASED_FIELDS, "num_attention_heads": heads}, "/m/config.json")


def test_zero_key_value_heads_is_named():
    """num_key_value_heads 0 read as one per query head (`kv or heads`); transformers
    divides by it (ZeroDivisionError), so it is refused as the count it is."""
    from moge.interop.pangu import PanguLayout

    with pytest.raises(ValueError, match=r"^/m/config\.json: model\.n_kv_heads: must be >= 1, got 0$"):
        PanguLayout().read_config({**RELEASED_FIELDS, "num_key_value_heads": 0}, "/m/config.json")
