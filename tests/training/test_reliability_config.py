"""Reliability of configs and the command line: bad configs, files, overrides, argv, data.

Every case goes through the real CLI (`moge.cli.main`) and must end in exit code 2 with
one stderr line `error: <dotted.field>: ...` and no traceback (the `cli_error` fixture,
tests/conftest.py). Rows of docs/reliability.md name these tests.
"""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import pytest
import yaml

import moge.training as train_mod

pytestmark = pytest.mark.usefixtures("one_thread")

DELETE = object()

# A small valid run; the bad-config table edits copies of it.
BASE = {
    "model": {"d_model": 32, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "max_seq_len": 64},
    "moe": {"num_experts": 8, "num_groups": 4, "top_k": 4, "expert_hidden": 16},
    "data": {"seq_len": 32},
    "train": {"steps": 10, "lr": 1.0e-3, "min_lr": 1.0e-4},
    "eval": {"batches": 2},
}


def _edited(edits: dict) -> dict:
    """BASE with dotted edits applied; value DELETE removes the key (or section)."""
    raw = copy.deepcopy(BASE)
    for dotted, value in edits.items():
        *parents, last = dotted.split(".")
        target = raw
        for key in parents:
            target = target[key]
        if value is DELETE:
            del target[last]
        else:
            target[last] = value
    return raw


def _write_yaml(path: Path, raw: dict) -> Path:
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


@pytest.fixture
def no_training(monkeypatch):
    """A config that slipped through validation must fail the test, not train in cwd."""

    def refuse(cfg, progress=True, stop_at=None):
        raise AssertionError(f"the CLI accepted a bad config: {cfg}")

    monkeypatch.setattr(train_mod, "train", refuse)


# =============================================================================== configs

FIELD_CASES = [
    # wrong types
    ({"model.d_model": "big"}, "model.d_model"),
    ({"model.n_layers": 2.5}, "model.n_layers"),
    ({"model.qkv_bias": "yes"}, "model.qkv_bias"),
    ({"model.tie_embeddings": "true"}, "model.tie_embeddings"),
    ({"model.rope_theta": "hot"}, "model.rope_theta"),
    ({"model.head_dim": [8]}, "model.head_dim"),
    ({"moe.num_experts": "8x"}, "moe.num_experts"),
    ({"moe.top_k": True}, "moe.top_k"),
    ({"moe.normalize_weights": 1}, "moe.normalize_weights"),
    ({"moe.route_scale": "large"}, "moe.route_scale"),
    ({"data.path": 5}, "data.path"),
    ({"data.seq_len": 32.0}, "data.seq_len"),
    ({"train.lr": "fast"}, "train.lr"),
    ({"train.lr": "nan"}, "train.lr"),
    ({"train.lr": 10**400}, "train.lr"),  # an integer beyond every float
    ({"moe.capacity_factor": -(10**400)}, "moe.capacity_factor"),
    ({"train.resume": "no"}, "train.resume"),
    ({"train.out_dir": 3}, "train.out_dir"),
    ({"train.out_dir": ""}, "train.out_dir"),  # would be the current folder
    ({"eval.batch_size": "8"}, "eval.batch_size"),
    ({"eval.plots": "no"}, "eval.plots"),
    ({"name": 5}, "name"),
    ({"name": ""}, "name"),
    # negative or zero sizes, out-of-range numbers
    ({"model.n_layers": -1}, "model.n_layers"),
    ({"model.n_heads": 0}, "model.n_heads"),
    ({"model.max_seq_len": 0}, "model.max_seq_len"),
    ({"model.norm_eps": -1.0e-5}, "model.norm_eps"),
    ({"model.init_std": 0}, "model.init_std"),
    ({"model.first_dense_layers": -1}, "model.first_dense_layers"),
    ({"model.moe_every": 0}, "model.moe_every"),
    ({"moe.expert_hidden": -16}, "moe.expert_hidden"),
    ({"moe.num_shared_experts": -1}, "moe.num_shared_experts"),
    ({"moe.shared_hidden": 0}, "moe.shared_hidden"),
    ({"moe.aux_loss_coef": -0.1}, "moe.aux_loss_coef"),
    ({"moe.z_loss_coef": -1.0}, "moe.z_loss_coef"),
    ({"moe.bias_update_rate": -0.01}, "moe.bias_update_rate"),
    ({"moe.route_scale": 0}, "moe.route_scale"),
    ({"moe.rre_seed": -1}, "moe.rre_seed"),
    ({"data.seq_len": 0}, "data.seq_len"),
    ({"data.val_fraction": 0.9}, "data.val_fraction"),
    ({"data.val_fraction": 0}, "data.val_fraction"),
    ({"data.seed": -1}, "data.seed"),
    ({"train.steps": 0}, "train.steps"),
    ({"train.batch_size": -4}, "train.batch_size"),
    ({"train.grad_accum": 0}, "train.grad_accum"),
    ({"train.warmup_steps": -1}, "train.warmup_steps"),
    ({"train.keep_last": 0}, "train.keep_last"),
    ({"train.grad_clip": -1.0}, "train.grad_clip"),
    ({"train.beta2": 1.5}, "train.beta2"),
    ({"train.threads": -1}, "train.threads"),
    ({"eval.batches": 0}, "eval.batches"),
    # sizes that do not fit together
    ({"moe.num_groups": 3}, "moe.num_groups"),  # 3 groups do not divide 8 experts
    ({"moe.top_k": 6}, "moe.top_k"),  # not a multiple of 4 groups
    ({"moe.top_k": 12, "moe.router": "global"}, "moe.top_k"),  # more than 8 experts
    ({"model.n_kv_heads": 3}, "model.n_kv_heads"),
    ({"model.d_model": 30}, "model.n_heads"),  # 4 heads do not divide 30
    ({"model.head_dim": 7}, "model.head_dim"),  # RoPE needs an even head size
    ({"data.seq_len": 128}, "data.seq_len"),  # over model.max_seq_len
    ({"model.max_seq_len": 16}, "data.seq_len"),
    ({"train.min_lr": 1.0}, "train.min_lr"),  # above train.lr
    ({"moe.router": "group_limited"}, "moe.topk_groups"),  # needs topk_groups
    ({"moe.router": "group_limited", "moe.topk_groups": 1}, "moe.topk_groups"),  # 2 experts < top_k
    ({"moe.router": "group_limited", "moe.topk_groups": 5}, "moe.topk_groups"),  # > num_groups
    ({"moe.router": "group_limited", "moe.num_groups": 8, "moe.topk_groups": 8}, "moe.group_score"),
    ({"moe.router": "random", "moe.rre_vocab_size": 100}, "moe.rre_vocab_size"),
    ({"moe.d_model": 64}, "moe.d_model"),
    # unknown names
    ({"moe.router": "fancy"}, "moe.router"),
    ({"moe.router": "GROUPED"}, "moe.router"),
    ({"moe.score_func": "tanh"}, "moe.score_func"),
    ({"moe.aux_loss_type": "token"}, "moe.aux_loss_type"),
    ({"moe.group_score": "mean"}, "moe.group_score"),
    ({"moe.expert_impl": "magic"}, "moe.expert_impl"),
    ({"train.dtype": "float64"}, "train.dtype"),
    ({"train.device": "tpu"}, "train.device"),
    # unknown keys
    ({"model.n_layer": 2}, "model.n_layer"),
    ({"model.D_model": 32}, "model.D_model"),
    ({"moe.experts": 8}, "moe.experts"),
    ({"moe.topk": 4}, "moe.topk"),
    ({"data.seqlen": 8}, "data.seqlen"),
    ({"train.learning_rate": 1.0}, "train.learning_rate"),
    ({"eval.foo": 1}, "eval.foo"),
    ({"optimizer": {}}, "optimizer"),
    # missing keys and sections of the wrong kind
    ({"moe.num_experts": DELETE}, "moe.num_experts"),
    ({"moe.top_k": DELETE}, "moe.top_k"),
    ({"moe": DELETE}, "moe.num_experts"),
    ({"model": [1, 2]}, "model"),
    ({"moe": "grouped"}, "moe"),
    ({"train": 5}, "train"),
]

# The mistakes also made as KEY=VALUE overrides: one or two of each kind. An override's
# value is parsed as YAML and merged into the file's config before the shared validation,
# so these pin the parsing (strings, bools, floats, lists), a merge that must precede the
# cross-field checks (moe.top_k against the groups, data.seq_len against the model) and
# the `override '...': ` prefix of unknown keys; the rest would repeat the file cases.
AS_OVERRIDES = [
    {"model.d_model": "big"},
    {"model.qkv_bias": "yes"},
    {"model.head_dim": [8]},
    {"moe.top_k": True},
    {"data.seq_len": 32.0},
    {"train.lr": "nan"},
    {"train.lr": 10**400},
    {"name": 5},
    {"data.val_fraction": 0.9},
    {"train.beta2": 1.5},
    {"moe.top_k": 6},
    {"model.max_seq_len": 16},
    {"moe.router": "group_limited", "moe.topk_groups": 1},
    {"moe.router": "fancy"},
    {"model.n_layer": 2},
]
COMMANDS = ("params", "train")  # both call moge.training.config.load_config: each case runs through one


def _overridable(edits: dict) -> bool:
    """Whether KEY=VALUE overrides can express `edits` (one section key each, no deletion)."""
    return all(
        v is not DELETE and k != "moe.d_model" and (k == "name" or len(k.split(".")) == 2)
        for k, v in edits.items()
    )


def _key(edits: dict) -> str:
    """Tells edits apart exactly (as dicts, {"x": True} == {"x": 1} and 32.0 == 32)."""
    return json.dumps({k: repr(v) for k, v in edits.items()})


def _field_params() -> list:
    """Case i as a file through COMMANDS[i % 2]; the AS_OVERRIDES ones also as overrides
    through the other command, so each of those meets both."""
    out = []
    for i, (edits, field) in enumerate(FIELD_CASES):
        command = COMMANDS[i % 2]
        out.append(pytest.param(edits, field, "file", command, id=f"{i:02d}-{field}-file-{command}"))
        if _key(edits) in {_key(e) for e in AS_OVERRIDES}:
            other = COMMANDS[(i + 1) % 2]
            out.append(pytest.param(edits, field, "override", other, id=f"{i:02d}-{field}-override-{other}"))
    return out


def test_the_table_is_large_enough():
    assert len(FIELD_CASES) >= 40, "at least 40 bad configs through the real CLI"
    assert len(FIELD_CASES) + len(FILE_CASES) + len(OVERRIDE_CASES) >= 40
    cases = {_key(e) for e, _ in FIELD_CASES}
    assert len(cases) == len(FIELD_CASES), "no duplicates"
    assert all(_key(e) in cases and _overridable(e) for e in AS_OVERRIDES), "overrides come from the table"
    commands = [p.values[3] for p in _field_params()]
    assert min(commands.count(c) for c in COMMANDS) >= 12, "each command gets a fair share"


@pytest.mark.parametrize("edits, field, mode, command", _field_params())
def test_bad_config_is_one_error_line_naming_the_field(
    tmp_path, cli_error, no_training, edits, field, mode, command
):
    if mode == "file":
        path, overrides = _write_yaml(tmp_path / "bad-run.yaml", _edited(edits)), []
    else:  # the same mistake made on the command line; JSON values are valid YAML
        path = _write_yaml(tmp_path / "bad-run.yaml", copy.deepcopy(BASE))
        overrides = [f"{k}={json.dumps(v)}" for k, v in edits.items()]
    # An override naming no key is refused as such ("override 'x=1': x: unknown key").
    prefix = "(override '[^']*': )?" if mode == "override" else ""
    line = cli_error([command, str(path), *overrides])
    assert re.match(f"error: {prefix}{re.escape(field)}: ", line), line
    assert mode == "override" or str(path) in line, "the error names the config file"


FILE_CASES = [
    ("empty", b""),
    ("comments-only", b"# nothing here\n"),
    ("yaml-list", b"- model\n- moe\n"),
    ("yaml-scalar", b"just text\n"),
    ("bad-syntax", b"model: {d_model: 32\nmoe: [\n"),
    ("bad-indent", b"model:\n  d_model: 32\n n_layers: 2\n"),
    ("tab-indent", b"model:\n\td_model: 32\n"),
    ("not-utf8", b"\xff\xfe\x00m\x00"),
    ("missing-file", None),
    ("a-folder", "folder"),
]


@pytest.mark.parametrize("content", [c[1] for c in FILE_CASES], ids=[c[0] for c in FILE_CASES])
def test_bad_config_file_is_one_error_line_naming_the_file(tmp_path, cli_error, no_training, content):
    path = tmp_path / "broken-config.yaml"
    if content == "folder":
        path.mkdir()
    elif content is not None:
        path.write_bytes(content)
    for command in COMMANDS:
        assert str(path) in cli_error([command, str(path)])


OVERRIDE_CASES = [
    ("train.steps", None),  # no =
    ("=5", None),
    ("train.stepz=5", "train.stepz"),
    ("optim.lr=1", "optim.lr"),
    ("model=3", "model"),
    ("train.steps.x=1", "train.steps.x"),
    ("moe.d_model=64", "moe.d_model"),
    ("train.steps=[", None),  # the value is not YAML
    ("train.steps=", "train.steps"),  # null for a required int
]


@pytest.mark.parametrize("override, field", OVERRIDE_CASES, ids=[o[0] for o in OVERRIDE_CASES])
def test_bad_override_is_one_error_line_naming_it(tmp_path, cli_error, no_training, override, field):
    path = _write_yaml(tmp_path / "run.yaml", copy.deepcopy(BASE))
    line = cli_error(["params", str(path), override])
    if field == "train.steps":  # a valid override whose value fails validation
        assert line.startswith("error: train.steps: "), line
    else:
        assert line.startswith(f"error: override {override!r}: "), line
        assert field is None or f"{field}:" in line, line


@pytest.mark.parametrize(
    "argv, fragment",
    [
        ([], "the following arguments are required: command"),
        (["fly"], "invalid choice: 'fly'"),
        (["train"], "the following arguments are required: config"),
        (["params", "x.yaml", "--bogus"], "unrecognized arguments: --bogus"),
        (["generate", "run", "--prompt", "x", "--tokens", "many"], "--tokens"),
    ],
)
def test_bad_command_line_is_one_error_line(cli_error, argv, fragment):
    assert fragment in cli_error(argv)


@pytest.mark.parametrize(
    "override",
    [f"model.vocab_size={10**18}", f"model.d_model={4 * 10**17}", f"moe.expert_hidden={10**18}"],
)
def test_sizes_too_large_for_torch_are_one_error_line(tmp_path, cli_error, override):
    # Valid int64 integers, but no tensor that big exists; `moge params` builds on the meta
    # device. (Beyond int64: tests/training/test_reliability_limits.py.)
    path = _write_yaml(tmp_path / "run.yaml", copy.deepcopy(BASE))
    line = cli_error(["params", str(path), override])
    assert line.startswith("error: model: ") and override.split("=")[0] in line, line


# ================================================================================== data


def _data_fault(tmp_path: Path, kind: str) -> tuple[str, str]:
    """(data.path to use, fragment the error must hold) for one broken corpus."""
    p = tmp_path / {"missing": "nope.txt", "empty": "empty.txt", "binary": "weights.txt", "folder": "corpus",
                    "odd_bin": "odd.bin", "empty_bin": "zero.bin", "short": "short.txt",
                    "short_bin": "short.bin"}[kind]  # fmt: skip
    if kind == "empty":
        p.write_bytes(b"")
    elif kind == "binary":
        p.write_bytes(b"\x00\x01" * 100)
    elif kind == "folder":
        p.mkdir()
        (p / "image.png").write_bytes(b"png")
    elif kind == "odd_bin":
        p.write_bytes(b"\x01\x00\x02")
    elif kind == "empty_bin":
        p.write_bytes(b"")
    elif kind == "short":
        p.write_text("x" * 40)  # 40 bytes cannot give train and val windows of 33
    elif kind == "short_bin":
        p.write_bytes(b"\x01\x00" * 40)
    field = "data.seq_len" if kind.startswith("short") else "data.path"
    return str(p), field


@pytest.mark.parametrize(
    "kind", ["missing", "empty", "binary", "folder", "odd_bin", "empty_bin", "short", "short_bin"]
)
def test_bad_corpus_is_one_error_line_and_no_run_dir(tmp_path, cli_error, kind):
    data_path, field = _data_fault(tmp_path, kind)
    config = _write_yaml(tmp_path / "run.yaml", copy.deepcopy(BASE))
    out_dir = tmp_path / "run"
    line = cli_error(["train", str(config), f"data.path={data_path}", f"train.out_dir={out_dir}"])
    assert line.startswith(f"error: {field}: ") and Path(data_path).name in line, line
    assert not out_dir.exists(), "nothing is written before the data is known to be good"


def test_out_dir_that_is_a_file_or_a_previous_run(tmp_path, cli_error):
    config = _write_yaml(tmp_path / "run.yaml", copy.deepcopy(BASE))
    (tmp_path / "file").write_text("x")
    line = cli_error(["train", str(config), f"train.out_dir={tmp_path / 'file'}"])
    assert line.startswith("error: train.out_dir: ") and "is not a folder" in line
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "metrics.jsonl").write_text("")
    line = cli_error(["train", str(config), f"train.out_dir={tmp_path / 'old'}"])
    assert line.startswith("error: train.out_dir: ") and "train.resume=true" in line


def test_an_empty_out_dir_writes_nothing_here(tmp_path, cli_error, monkeypatch):
    raw = copy.deepcopy(BASE)
    raw.setdefault("train", {})["out_dir"] = ""  # Path("") is the current folder
    config = _write_yaml(tmp_path / "run.yaml", raw)
    here = tmp_path / "here"
    here.mkdir()
    monkeypatch.chdir(here)
    line = cli_error(["train", str(config)])
    assert line.startswith("error: train.out_dir: is empty"), line
    assert not any(here.iterdir()), "nothing is written into the current folder"
