"""Tests for moge/training/config.py: presets, YAML loading, overrides, round trips, error messages."""

from __future__ import annotations

import copy
import dataclasses
import re
from pathlib import Path

import pytest
import yaml

from moge import MoGEConfig
from moge.training.config import (
    RunConfig,
    apply_overrides,
    config_from_dict,
    config_to_dict,
    load_config,
    save_config,
)

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
PRESETS = (
    "tiny-moge",
    "tiny-moe",
    "tiny-deepseek",
    "small-moge",
    "pangu-pro-moe-72b",
    "tiny-sigma",
    "tiny-sigma-moge",
    "tiny-upcycle",
)

# A small valid config; the bad-config table edits copies of it.
BASE = {
    "model": {"d_model": 32, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "max_seq_len": 64},
    "moe": {"num_experts": 8, "num_groups": 4, "top_k": 4, "expert_hidden": 16},
    "data": {"seq_len": 32},
    "train": {"steps": 10, "lr": 1.0e-3, "min_lr": 1.0e-4},
    "eval": {"batches": 2},
}
DELETE = object()


def count_params(cfg: RunConfig) -> tuple[int, int]:
    """(total, activated per token) parameters of the decoder `cfg` describes, analytically.

    Per block: q, k, v, o projections (+ q/k/v biases), 2 RMSNorm weights, and either a
    dense SwiGLU or router + E SwiGLU experts + merged shared SwiGLU + learned expert
    scale; plus embedding, final norm and LM head (unless tied). Activated counts top_k
    routed experts and leaves out the E-sized expert scale, as the paper's Table 1 does.
    """
    m, moe = cfg.model, cfg.moe
    d, q_width, kv_width = m.d_model, m.n_heads * m.resolved_head_dim, m.n_kv_heads * m.resolved_head_dim
    attention = 2 * d * q_width + 2 * d * kv_width + ((q_width + 2 * kv_width) if m.qkv_bias else 0)
    attention += d if m.o_bias else 0
    common = attention + 2 * d
    expert = 3 * d * moe.expert_hidden
    moe_common = d * moe.num_experts + 3 * d * moe.shared_width
    total = active = 0
    for index in range(m.n_layers):
        if m.is_moe_layer(index):
            scale = moe.num_experts if moe.learned_expert_scale else 0
            total += common + moe_common + moe.num_experts * expert + scale
            active += common + moe_common + moe.top_k * expert
        else:
            dense = 3 * d * m.resolved_dense_hidden
            total, active = total + common + dense, active + common + dense
    outer = m.vocab_size * d + d + (0 if m.tie_embeddings else m.vocab_size * d)
    return total + outer, active + outer


def _edited(edits: dict) -> dict:
    """BASE with dotted edits applied; value DELETE removes the key."""
    raw = copy.deepcopy(BASE)
    for dotted, value in edits.items():
        *parents, last = dotted.split(".")
        target = raw
        for key in parents:
            target = target.setdefault(key, {})
        if value is DELETE:
            del target[last]
        else:
            target[last] = value
    return raw


def _write(tmp_path: Path, raw: dict, name: str = "run.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


# ----------------------------------------------------------------------------- presets


def test_configs_folder_holds_exactly_the_presets():
    assert sorted(p.stem for p in CONFIGS.glob("*.yaml")) == sorted(PRESETS)


@pytest.mark.parametrize("preset", PRESETS)
def test_preset_loads_and_is_named_after_its_file(preset):
    cfg = load_config(CONFIGS / f"{preset}.yaml")
    assert cfg.name == preset
    assert cfg.moe.d_model == cfg.model.d_model
    assert cfg.data.seq_len <= cfg.model.max_seq_len


def test_tiny_presets_differ_only_in_routing():
    base = config_to_dict(load_config(CONFIGS / "tiny-moge.yaml"))
    for preset, moe_changes in [
        ("tiny-moe", {"router": "global"}),
        (
            "tiny-deepseek",
            {
                "router": "group_limited",
                "topk_groups": 2,
                "score_func": "sigmoid",
                "normalize_weights": True,
                "bias_update_rate": 0.001,
                "aux_loss_coef": 0.0,
            },
        ),
    ]:
        other = config_to_dict(load_config(CONFIGS / f"{preset}.yaml"))
        expected = copy.deepcopy(base)
        expected["name"] = preset
        expected["moe"].update(moe_changes)
        assert other == expected, preset


def test_tiny_moge_preset_values():
    cfg = load_config(CONFIGS / "tiny-moge.yaml")
    m, moe, t = cfg.model, cfg.moe, cfg.train
    assert (m.vocab_size, m.d_model, m.n_layers, m.n_heads, m.n_kv_heads, m.max_seq_len) == (
        256,
        128,
        4,
        4,
        2,
        128,
    )
    assert (moe.num_experts, moe.num_groups, moe.top_k, moe.expert_hidden) == (16, 4, 4, 128)
    assert (moe.router, moe.num_shared_experts, moe.learned_expert_scale) == ("grouped", 1, True)
    assert moe.aux_loss_coef == 0.001
    assert (t.steps, t.batch_size, t.lr, t.min_lr, t.warmup_steps) == (600, 16, 3e-3, 3e-4, 50)


def test_pangu_pro_moe_72b_parameter_counts():
    cfg = load_config(CONFIGS / "pangu-pro-moe-72b.yaml")
    assert cfg.moe.shared_width == 5376 and cfg.model.resolved_head_dim == 128
    total, active = count_params(cfg)
    assert round(total / 1e9, 2) == 71.99, total
    assert round(active / 1e9, 2) == 16.50, active


def test_small_moge_parameter_count_matches_its_comment():
    path = CONFIGS / "small-moge.yaml"
    total, active = count_params(load_config(path))
    assert 10e6 <= total <= 30e6
    text = path.read_text()
    assert f"{total:,} total" in text and f"{active:,} activated" in text


def test_count_params_counts_dense_blocks_and_tied_embeddings():
    cfg = load_config(CONFIGS / "tiny-moge.yaml", ["model.first_dense_layers=4", "model.tie_embeddings=true"])
    d = 128
    block = 2 * d * d + 2 * d * 64 + 2 * d + 3 * d * 4 * d
    assert count_params(cfg) == (4 * block + 256 * d + d,) * 2


# ---------------------------------------------------------------------------- loading


def test_overrides_set_typed_values():
    cfg = load_config(
        CONFIGS / "tiny-moge.yaml",
        ["train.steps=50", "moe.router=global", "model.qkv_bias=true", "train.lr=3e-4", "name=foo"],
    )
    assert cfg.train.steps == 50
    assert cfg.moe.router == "global"
    assert cfg.model.qkv_bias is True
    assert cfg.train.lr == 3e-4 and isinstance(cfg.train.lr, float)
    assert cfg.name == "foo"


def test_later_override_wins_and_null_restores_optional_default():
    cfg = load_config(
        CONFIGS / "pangu-pro-moe-72b.yaml", ["train.steps=5", "train.steps=7", "moe.shared_hidden=null"]
    )
    assert cfg.train.steps == 7
    assert cfg.moe.shared_hidden is None and cfg.moe.shared_width == 4 * 1344


def test_apply_overrides_does_not_modify_its_input():
    raw = copy.deepcopy(BASE)
    out = apply_overrides(raw, ["model.d_model=64", "name=x"])
    assert raw == BASE
    assert out["model"]["d_model"] == 64 and out["name"] == "x"


def test_float_fields_accept_ints_and_numeric_strings(tmp_path):
    path = tmp_path / "f.yaml"
    path.write_text(
        "model: {rope_theta: 10000}\n"
        "moe: {num_experts: 8, num_groups: 4, top_k: 4, expert_hidden: 16, route_scale: '2.5'}\n"
        "train: {lr: 1e-3, min_lr: 1e-4}\n"
    )
    assert yaml.safe_load(path.read_text())["train"]["lr"] == "1e-3"  # YAML 1.1 reads a string
    cfg = load_config(path)
    assert cfg.train.lr == 1e-3 and cfg.train.min_lr == 1e-4 and cfg.moe.route_scale == 2.5
    assert cfg.model.rope_theta == 10000.0 and isinstance(cfg.model.rope_theta, float)


def test_an_integer_too_large_for_a_float_is_a_value_error_naming_the_field():
    """YAML reads 1 followed by 400 zeros as an int; float() of it overflows."""
    with pytest.raises(ValueError, match=r"^train\.lr: must be finite, got 1000.*too large for a float"):
        load_config(CONFIGS / "tiny-moge.yaml", ["train.lr=1" + "0" * 400])
    with pytest.raises(ValueError, match=r"^route_scale: must be finite"):  # the dataclass itself
        MoGEConfig(d_model=8, num_experts=4, num_groups=2, top_k=2, expert_hidden=4, route_scale=10**400)


def test_empty_or_missing_sections_take_defaults(tmp_path):
    path = tmp_path / "defaults.yaml"
    path.write_text(
        "moe:\n  num_experts: 8\n  num_groups: 2\n  top_k: 2\n  expert_hidden: 16\ntrain:\neval:\n"
    )
    cfg = load_config(path)
    assert cfg.name == "defaults"
    assert cfg.model == type(cfg.model)() and cfg.train == type(cfg.train)()


def test_moe_d_model_is_accepted_when_it_equals_model_d_model(tmp_path):
    cfg = load_config(_write(tmp_path, _edited({"moe.d_model": 32})))
    assert cfg.moe.d_model == 32


def test_parallel_section_defaults_and_overrides():
    cfg = load_config(CONFIGS / "tiny-moge.yaml")
    assert (cfg.parallel.expert_parallel, cfg.parallel.backend, cfg.parallel.static_splits) == (1, None, None)
    cfg = load_config(CONFIGS / "tiny-moge.yaml", ["parallel.expert_parallel=4", "parallel.backend=gloo"])
    assert (cfg.parallel.expert_parallel, cfg.parallel.backend) == (4, "gloo")
    assert config_from_dict(config_to_dict(cfg)) == cfg


def test_random_router_takes_rre_vocab_size_from_the_model():
    cfg = load_config(CONFIGS / "tiny-moge.yaml", ["moe.router=random", "model.vocab_size=300"])
    assert cfg.moe.rre_vocab_size == 300


def test_errors_from_a_file_name_the_file(tmp_path):
    path = _write(tmp_path, _edited({"moe.top_k": 6}), name="named.yaml")
    with pytest.raises(ValueError, match=re.escape(str(path))):
        load_config(path)


# ------------------------------------------------------------------------- round trip


@pytest.mark.parametrize("preset", PRESETS)
def test_save_config_round_trips(tmp_path, preset):
    cfg = load_config(CONFIGS / f"{preset}.yaml", ["moe.router=random", "train.lr=1e-3"])
    path = tmp_path / "out" / "config.yaml"
    save_config(cfg, path)
    assert "d_model" not in yaml.safe_load(path.read_text())["moe"]
    assert load_config(path) == cfg


def test_config_from_dict_round_trips_and_accepts_asdict():
    cfg = load_config(CONFIGS / "tiny-deepseek.yaml")
    d = config_to_dict(cfg)
    frozen = copy.deepcopy(d)
    assert config_from_dict(d) == cfg
    assert d == frozen
    full = {"name": cfg.name, **{k: dataclasses.asdict(getattr(cfg, k)) for k in frozen if k != "name"}}
    assert config_from_dict(full) == cfg


# ------------------------------------------------------------------------- bad configs

FIELD_ERRORS = [
    ({"model.d_model": "big"}, [], "model.d_model"),
    ({"model.n_layers": -1}, [], "model.n_layers"),
    ({"model.n_heads": 0}, [], "model.n_heads"),
    ({"model.qkv_bias": "maybe"}, [], "model.qkv_bias"),
    ({"model.n_kv_heads": 3}, [], "model.n_kv_heads"),
    ({"model.rope_theta": "hot"}, [], "model.rope_theta"),
    ({"model.norm_eps": -1e-5}, [], "model.norm_eps"),
    (
        {"model.n_layer": 2},
        [],
        "model.n_layer: unknown key; valid keys: activation_checkpointing, d_model, dense_hidden,",
    ),
    ({"moe.num_experts": 0}, [], "moe.num_experts"),
    ({"moe.num_experts": DELETE}, [], "moe.num_experts"),
    ({"moe.num_groups": 3}, [], "moe.num_groups"),
    ({"moe.top_k": 6}, [], "moe.top_k"),
    ({"moe.top_k": 12, "moe.router": "global"}, [], "moe.top_k"),
    ({"moe.top_k": True}, [], "moe.top_k"),
    ({"moe.expert_hidden": 1.5}, [], "moe.expert_hidden"),
    ({"moe.router": "fancy"}, [], "moe.router"),
    ({"moe.score_func": "tanh"}, [], "moe.score_func"),
    ({"moe.aux_loss_coef": -0.1}, [], "moe.aux_loss_coef"),
    ({"moe.router": "group_limited"}, [], "moe.topk_groups"),
    ({"moe.router": "random", "moe.rre_vocab_size": 100}, [], "moe.rre_vocab_size"),
    ({"moe.d_model": 64}, [], "moe.d_model"),
    ({"moe.experts": 8}, [], "moe.experts: unknown key"),
    ({"data.seqlen": 8}, [], "data.seqlen: unknown key"),
    ({"data.seq_len": 128}, [], "data.seq_len"),
    ({"data.val_fraction": 0.9}, [], "data.val_fraction"),
    ({"train.learning_rate": 1.0}, [], "train.learning_rate: unknown key"),
    ({"train.lr": "fast"}, [], "train.lr"),
    ({"train.min_lr": 1.0}, [], "train.min_lr"),
    ({"train.dtype": "float64"}, [], "train.dtype"),
    ({"train.steps": 0}, [], "train.steps"),
    ({"eval.foo": 1}, [], "eval.foo: unknown key"),
    ({"eval.plots": "no"}, [], "eval.plots"),
    (
        {"optimizer": {}},
        [],
        "optimizer: unknown key; valid keys: data, eval, model, moe, monitor, name, parallel, train",
    ),
    ({"parallel.expert_parallel": 0}, [], "parallel.expert_parallel: must be >= 1"),
    ({"parallel.expert_parallel": 3}, [], "parallel.expert_parallel: 3 ranks do not divide moe.num_groups=4"),
    ({"parallel.backend": "mpi"}, [], "parallel.backend: expected one of gloo, nccl"),
    ({"parallel.backend": "nccl"}, [], "parallel.backend: nccl does not fit train.device=cpu"),
    (
        {"parallel.static_splits": True, "moe.router": "global"},
        [],
        "parallel.static_splits: the global router",
    ),
    ({"parallel.static_splits": "yes"}, [], "parallel.static_splits: expected true or false"),
    (
        {"parallel.ranks": 2},
        [],
        "parallel.ranks: unknown key; valid keys: backend, data_parallel, expert_parallel, mixed_precision, static_splits",
    ),
    ({}, ["parallel.expert_parallel=8"], "parallel.expert_parallel: 8 ranks"),
    ({"name": 5}, [], "name"),
    ({"model": [1, 2]}, [], "model: expected a mapping"),
    ({"moe": "grouped"}, [], "moe: expected a mapping"),
    ({}, ["data.seq_len=1000"], "data.seq_len"),
    ({}, ["moe.top_k=5"], "moe.top_k"),
    ({}, ["train.steps=-3"], "train.steps"),
]


@pytest.mark.parametrize(
    "edits, overrides, field",
    FIELD_ERRORS,
    ids=[f"{i:02d}-{e[2].split(':')[0]}" for i, e in enumerate(FIELD_ERRORS)],
)
def test_bad_config_names_the_field(tmp_path, edits, overrides, field):
    path = _write(tmp_path, _edited(edits))
    with pytest.raises(ValueError, match="^" + re.escape(field)):
        load_config(path, overrides)


FILE_ERRORS = [
    ("empty", "", ValueError),
    ("comments-only", "# nothing here\n", ValueError),
    ("yaml-list", "- model\n- moe\n", ValueError),
    ("yaml-scalar", "just text\n", ValueError),
    ("bad-syntax", "model: {d_model: 32\nmoe: [\n", ValueError),
    ("bad-indent", "model:\n  d_model: 32\n n_layers: 2\n", ValueError),
    ("missing-file", None, FileNotFoundError),
]


@pytest.mark.parametrize("text, error", [e[1:] for e in FILE_ERRORS], ids=[e[0] for e in FILE_ERRORS])
def test_bad_file_names_the_file(tmp_path, text, error):
    path = tmp_path / "broken-config.yaml"
    if text is not None:
        path.write_text(text)
    with pytest.raises(error, match=re.escape(str(path))):
        load_config(path)


OVERRIDE_ERRORS = [
    "train.steps",
    "=5",
    "train.stepz=5",
    "optim.lr=1",
    "model=3",
    "train.steps.x=1",
    "moe.d_model=64",
]


@pytest.mark.parametrize("override", OVERRIDE_ERRORS)
def test_bad_override_names_the_override(override):
    with pytest.raises(ValueError, match=re.escape(f"override {override!r}")):
        load_config(CONFIGS / "tiny-moge.yaml", [override])


def test_unknown_override_lists_the_valid_keys():
    with pytest.raises(
        ValueError, match=re.escape("train.stepz: unknown key; valid keys: batch_size, beta1,")
    ):
        load_config(CONFIGS / "tiny-moge.yaml", ["train.stepz=5"])


def test_config_from_dict_rejects_a_non_mapping_naming_the_source():
    with pytest.raises(ValueError, match=re.escape("ckpt/step_10")):
        config_from_dict(["model"], source="ckpt/step_10")
    with pytest.raises(ValueError, match="^" + re.escape("name: required")):
        config_from_dict(copy.deepcopy(BASE))


@pytest.mark.parametrize(
    ("override", "message"),
    [
        (
            "moe.num_experts=15",
            "moe.num_groups: 4 groups do not divide num_experts=15 (in override 'moe.num_experts=15')",
        ),
        ("moe.router=group_limited", "needs topk_groups (in override 'moe.router=group_limited')"),
        ("name=", "(in override 'name=')"),
        ("moe.num_groups=3", "(in override 'moe.num_groups=3')"),
        # The rule's other field, named with its section: the same section, then another one.
        ("train.lr=1e-7", "train.min_lr: 0.0003 is above train.lr=1e-07 (in override 'train.lr=1e-7')"),
        (
            "model.max_seq_len=64",
            "data.seq_len: 128 exceeds model.max_seq_len=64 (in override 'model.max_seq_len=64')",
        ),
    ],
)
def test_an_error_between_fields_names_the_override_that_caused_it(override, message):
    with pytest.raises(ValueError) as err:
        load_config("tiny-moge", [override, "train.steps=3"])
    assert message in str(err.value)


def test_an_error_of_the_file_itself_names_the_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text((CONFIGS / "tiny-moge.yaml").read_text().replace("num_experts: 16", "num_experts: 15"))
    with pytest.raises(ValueError, match=rf"do not divide num_experts=15 \(in {re.escape(str(path))}\)"):
        load_config(path, ["train.steps=3"])


def test_a_key_that_is_not_a_string_is_shown_as_what_it_is():
    """YAML 1.1 reads `on:` as True: the error shows the key, not a slice of its repr."""
    d = config_to_dict(load_config("tiny-moge"))
    with pytest.raises(ValueError, match=r"train\.True \(a bool key, not a string\): unknown key"):
        config_from_dict({**d, "train": {**d["train"], True: 5}})
    with pytest.raises(ValueError, match=r"train\.123 \(a int key, not a string\): unknown key"):
        config_from_dict({**d, "train": {**d["train"], 123: 5}})
