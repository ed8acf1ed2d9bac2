"""Reliability of checkpoints: a manifest that cannot lie, typed and ranged state, a full disk.

Every way of damaging one below ends in one ValueError (or one CLI line) naming the
file; the edits that re-sign state.json show the schema checks hold even when the digest
agrees. docs/reliability.md ("Checkpoints: verification") points here.
"""

from __future__ import annotations

import copy
import errno
import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

import moge.training.checkpoint as ckpt_mod
import moge.training.loop as train_mod
from moge.model import MoGETransformer
from moge.training.checkpoint import find_checkpoint, load_checkpoint, load_run, verify_checkpoint
from moge.training.config import config_from_dict

pytestmark = pytest.mark.usefixtures("one_thread")
SHARD = "shard-00001-model-00001-of-00001.safetensors"  # the one shard (model + AdamW state) of one process

CFG = {
    "name": "ck",
    "model": {"d_model": 32, "n_layers": 1, "n_heads": 4, "n_kv_heads": 2, "max_seq_len": 16},
    "moe": {"num_experts": 4, "num_groups": 2, "top_k": 2, "expert_hidden": 16},
    "data": {"seq_len": 16},
    "train": {"steps": 4, "batch_size": 2, "warmup_steps": 1, "log_every": 100, "eval_every": 0,
              "eval_batches": 1, "save_every": 2, "keep_last": 2, "threads": 1},
}  # fmt: skip


def cfg_of(out_dir: Path, **train_kw):
    raw = copy.deepcopy(CFG)
    raw["train"].update(out_dir=str(out_dir), **train_kw)
    return config_from_dict(raw)


@pytest.fixture(scope="module")
def two_steps(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("ck") / "run"
    train_mod.train(cfg_of(run, steps=2, save_every=0), progress=False)
    return run


@pytest.fixture
def run(two_steps, tmp_path) -> Path:
    dst = tmp_path / "run"
    shutil.copytree(two_steps, dst)
    return dst


def sign(folder: Path, data: bytes) -> None:
    """Write state.json and a matching digest: a deliberate edit, past the digest check."""
    (folder / "state.json").write_bytes(data)
    (folder / "state.json.sha256").write_text(hashlib.sha256(data).hexdigest() + "\n")


def edit_state(folder: Path, fn) -> None:
    state = json.loads((folder / "state.json").read_text())
    fn(state)
    sign(folder, json.dumps(state).encode())


def record(folder: Path, name: str) -> None:
    """Make the manifest vouch for the current bytes of `name`."""
    data = (folder / name).read_bytes()

    def fn(state):
        state["files"][name] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}

    edit_state(folder, fn)


def rewrite_tensors(folder: Path, name: str, fn) -> None:
    file = folder / name
    with safe_open(str(file), "pt") as f:
        meta = f.metadata()
    tensors = load_file(str(file))
    fn(tensors)
    save_file(tensors, str(file), metadata=meta)
    record(folder, name)


def load_everything(run: Path) -> int:
    cfg = cfg_of(run)
    torch.manual_seed(0)
    model = MoGETransformer(cfg.model, cfg.moe)
    opt = train_mod.build_optimizer(model, cfg.train)
    return load_checkpoint(run, model, opt, torch.Generator())


# ============================================================================ state.json: types and ranges

BAD_STATE = {
    "files_as_list": (lambda s: s.update(files=list(s["files"])), "'files' must be a non-empty mapping"),
    "files_empty": (lambda s: s.update(files={}), "'files' must be a non-empty mapping"),
    "files_null": (lambda s: s.update(files=None), "'files' must be a non-empty mapping"),
    "entry_empty": (
        lambda s: s["files"].update({SHARD: {}}),
        "must hold exactly 'bytes' and 'sha256'",
    ),
    "entry_a_string": (lambda s: s["files"].update({SHARD: "ok"}), "must hold exactly"),
    "entry_extra_key": (lambda s: s["files"][SHARD].update(mode=1), "must hold exactly"),
    "bytes_negative": (
        lambda s: s["files"][SHARD].update(bytes=-1),
        ".bytes must be an integer >= 0",
    ),
    "bytes_float": (lambda s: s["files"][SHARD].update(bytes=1.5), ".bytes must be an integer"),
    "bytes_bool": (lambda s: s["files"][SHARD].update(bytes=True), ".bytes must be an integer"),
    "bytes_huge": (
        lambda s: s["files"][SHARD].update(bytes=2**70),
        ".bytes must be an integer",
    ),
    "sha_short": (
        lambda s: s["files"][SHARD].update(sha256="abc"),
        ".sha256 must be 64 lowercase hex",
    ),
    "sha_null": (lambda s: s["files"][SHARD].update(sha256=None), ".sha256 must be 64"),
    "sha_upper": (
        lambda s: s["files"][SHARD].update(sha256=s["files"][SHARD]["sha256"].upper()),
        ".sha256 must be 64 lowercase hex",
    ),
    "name_with_slash": (
        lambda s: s["files"].update({"../x": s["files"][SHARD]}),
        "invalid file name",
    ),
    "name_dotdot": (
        lambda s: s["files"].update({"..": s["files"][SHARD]}),
        "invalid file name",
    ),
    "name_empty": (lambda s: s["files"].update({"": s["files"][SHARD]}), "invalid file name"),
    "step_null": (lambda s: s.update(step=None), "'step' must be an integer in 0..2**53"),
    "step_negative": (lambda s: s.update(step=-2), "'step' must be an integer in 0..2**53"),
    "step_string": (lambda s: s.update(step="2"), "'step' must be an integer"),
    "step_float": (lambda s: s.update(step=2.0), "'step' must be an integer"),
    "step_bool": (lambda s: s.update(step=True), "'step' must be an integer"),
    "step_huge": (lambda s: s.update(step=2**60), "'step' must be an integer in 0..2**53"),
    "step_other_folder": (lambda s: s.update(step=3), "'step' is 3 but the folder is step_00000002"),
    "config_a_list": (lambda s: s.update(config=[1]), "'config' must be a mapping"),
    "config_bad_value": (
        lambda s: s["config"]["model"].update(d_model="big"),
        "model.d_model: expected an integer",
    ),
    "step_beyond_steps": (
        lambda s: s["config"]["train"].update(steps=1),
        "'step' 2 is beyond the run's train.steps=1",
    ),
    "step_missing": (lambda s: s.pop("step"), "the key 'step' is missing"),
    "unknown_key": (lambda s: s.update(extra=1), "unknown keys extra"),
    "rng_a_string": (lambda s: s.update(rng="rng.safetensors"), "'rng' must be"),
}


@pytest.mark.parametrize("kind", list(BAD_STATE))
def test_state_json_with_a_wrong_type_or_range_is_one_error_line(run, cli_error, kind):
    fn, fragment = BAD_STATE[kind]
    folder = find_checkpoint(run)
    edit_state(folder, fn)
    line = cli_error(["generate", str(run), "--prompt", "Hi", "--tokens", "1"])
    assert fragment in line and "state.json" in line, line


RAW_STATE = {
    "step_1e400": (lambda t: t.replace('"step": 2', '"step": 1e400'), "'step' must be an integer"),
    "step_nan": (lambda t: t.replace('"step": 2', '"step": NaN'), "NaN is not a JSON number"),
    "duplicate_key": (lambda t: t.replace('"step": 2', '"step": 2, "step": 1'), "'step' appears twice"),
    "not_an_object": (lambda t: "[1, 2]", "expected a JSON object, got list"),
    "not_json": (lambda t: t[:-10], "not a readable JSON checkpoint state"),
    "not_utf8": (lambda t: t.replace('"ck"', '"\udcff"'), "not a readable JSON checkpoint state"),
    "deep": (lambda t: "[" * 100000 + "]" * 100000, "not a readable JSON checkpoint state"),
}


@pytest.mark.parametrize("kind", list(RAW_STATE))
def test_state_json_text_that_is_not_a_state_is_one_error_line(run, cli_error, kind):
    fn, fragment = RAW_STATE[kind]
    folder = find_checkpoint(run)
    text = json.dumps(json.loads((folder / "state.json").read_text()))
    sign(folder, fn(text).encode("utf-8", "surrogateescape"))
    line = cli_error(["eval", str(run), "--batches", "1"])
    assert fragment in line and "state.json" in line, line


# ============================================================================ the manifest's own digest


def _flip_config_value(folder: Path) -> None:
    data = (folder / "state.json").read_bytes()
    i = data.index(b'"init_std": 0.02') + len('"init_std": 0.0')
    (folder / "state.json").write_bytes(data[:i] + b"3" + data[i + 1 :])  # 0.02 -> 0.03: still valid


def _flip_step(folder: Path) -> None:
    data = (folder / "state.json").read_bytes()
    (folder / "state.json").write_bytes(data.replace(b'"step": 2', b'"step": 0'))


DIGEST_DAMAGE = {
    "config_value_flipped": (_flip_config_value, "state.json: corrupted: its sha256 differs"),
    "step_flipped": (_flip_step, "state.json: corrupted: its sha256 differs"),
    "digest_missing": (lambda f: (f / "state.json.sha256").unlink(), "state.json.sha256: missing"),
    "digest_garbage": (lambda f: (f / "state.json.sha256").write_text("xyz\n"), "not a sha256 hex digest"),
    "digest_not_ascii": (
        lambda f: (f / "state.json.sha256").write_bytes(b"\xff" * 64),
        "not a sha256 hex digest",
    ),
    "digest_of_other": (
        lambda f: (f / "state.json.sha256").write_text(hashlib.sha256(b"x").hexdigest()),
        "state.json: corrupted",
    ),
    "state_a_folder": (
        lambda f: ((f / "state.json").unlink(), (f / "state.json").mkdir()),
        "not a regular file",
    ),
}


@pytest.mark.parametrize("kind", list(DIGEST_DAMAGE))
def test_a_flip_in_state_json_cannot_hide(run, cli_error, kind):
    fn, fragment = DIGEST_DAMAGE[kind]
    fn(find_checkpoint(run))
    line = cli_error(["generate", str(run), "--prompt", "Hi", "--tokens", "1"])
    assert fragment in line, line


# ============================================================================ every file listed and verified


@pytest.mark.parametrize("name", [SHARD, "rng.safetensors"])
def test_a_file_dropped_from_the_manifest_is_refused(run, name):
    folder = find_checkpoint(run)
    data = bytearray((folder / name).read_bytes())
    data[-1] ^= 0x01  # damaged AND unlisted: the damage must not go unnoticed
    (folder / name).write_bytes(bytes(data))
    edit_state(folder, lambda s: s["files"].pop(name))
    listed = f"{name}: not listed in .*state.json, so it cannot be verified"  # a required file
    with pytest.raises(ValueError, match=f"{listed}|holds files state.json does not list: {name}"):
        load_run(run)  # even generate, which reads only the model, verifies every file


@pytest.mark.parametrize("name", [SHARD, "rng.safetensors"])
def test_damage_to_any_file_stops_even_a_model_only_load(run, name):
    folder = find_checkpoint(run)
    data = bytearray((folder / name).read_bytes())
    data[-1] ^= 0x01
    (folder / name).write_bytes(bytes(data))
    with pytest.raises(ValueError, match=f"{name}: corrupted: its sha256 differs"):
        load_run(run)


@pytest.mark.parametrize("extra", ["notes.txt", "model.safetensors.bak", ".tmp-x"])
def test_a_file_the_manifest_does_not_list_is_refused(run, extra):
    folder = find_checkpoint(run)
    (folder / extra).write_text("x")
    with pytest.raises(ValueError, match=f"holds files state.json does not list: {extra}"):
        verify_checkpoint(folder)


def test_a_listed_file_that_is_a_folder_is_refused(run):
    folder = find_checkpoint(run)
    (folder / "rng.safetensors").unlink()
    (folder / "rng.safetensors").mkdir()
    with pytest.raises(ValueError, match="rng.safetensors: not a regular file"):
        load_run(run)


def test_manifest_lists_every_file_and_a_clean_checkpoint_verifies(run):
    folder = find_checkpoint(run)
    state = verify_checkpoint(folder)
    assert sorted(state["files"]) == ["rng.safetensors", SHARD]
    digest = (folder / "state.json.sha256").read_text().strip()
    assert digest == hashlib.sha256((folder / "state.json").read_bytes()).hexdigest()
    assert load_everything(run) == 2


# ============================================================================ dtypes and values of tensors


@pytest.mark.parametrize("dtype", [torch.int32, torch.float64, torch.bfloat16, torch.float16])
def test_weights_of_another_dtype_are_refused_not_cast(run, dtype):
    folder = find_checkpoint(run)
    rewrite_tensors(
        folder, SHARD, lambda t: t.update({"model.norm.weight": t["model.norm.weight"].to(dtype)})
    )
    with pytest.raises(
        ValueError,
        match=rf"step_00000002: dtype mismatch.*norm.weight saved {dtype} vs model torch.float32",
    ):
        load_run(run)


def _opt_key(tensors: dict, suffix: str) -> str:
    return next(k for k in sorted(tensors) if k.endswith(suffix))


BAD_OPT = {  # the AdamW state lives in the shards as optim.<param>.<key>
    "moment_dtype": (
        lambda t: t.update({(k := _opt_key(t, "exp_avg")): t[k].double()}),
        "dtype mismatch (never cast silently)",
    ),
    "moment_shape": (lambda t: t.update({(k := _opt_key(t, "exp_avg")): t[k].flatten()[:1]}), "saved (1,)"),
    "moment_nan": (lambda t: t[_opt_key(t, "exp_avg_sq")].view(-1).__setitem__(0, float("nan")), "NaN/Inf"),
    "second_moment_negative": (
        lambda t: t[_opt_key(t, "exp_avg_sq")].view(-1).__setitem__(0, -1.0),
        "negative",
    ),
    "step_negative": (
        lambda t: t.update({_opt_key(t, ".step"): torch.tensor(-1.0)}),
        "one finite number >= 0",
    ),
    "step_int": (lambda t: t.update({_opt_key(t, ".step"): torch.tensor(2)}), "saved torch.int64"),
    "step_vector": (lambda t: t.update({_opt_key(t, ".step"): torch.ones(3)}), "saved (3,)"),
}


@pytest.mark.parametrize("kind", list(BAD_OPT))
def test_optimizer_state_of_the_wrong_dtype_shape_or_range_names_the_file(run, kind):
    fn, fragment = BAD_OPT[kind]
    rewrite_tensors(find_checkpoint(run), SHARD, fn)
    with pytest.raises(ValueError, match="step_00000002") as err:
        load_everything(run)
    assert fragment in str(err.value)


@pytest.mark.parametrize(
    "groups, fragment",
    [
        ('{"a": 1}', "param_groups must be a JSON list"),
        ('[{"params": "all"}]', "must be a mapping with a 'params' list"),
        ('[{"params": [1, 2]}]', "'params' must list parameter names"),
        ('[{"params": [], "weight_decay": -1}]', "weight_decay must be a finite number >= 0"),
        ('[{"params": [], "lr": "fast"}]', "lr must be a finite number >= 0"),
        ('[{"params": [], "betas": [0.9, 1.5]}]', "betas must be two numbers in [0, 1)"),
        ('[{"params": [], "betas": [0.9]}]', "betas must be two numbers"),
    ],
)
def test_optimizer_param_groups_with_wrong_types_name_the_file(run, groups, fragment):
    folder = find_checkpoint(run)  # the param groups are JSON in state.json
    edit_state(folder, lambda s: s["optimizer"].update(param_groups=json.loads(groups)))
    with pytest.raises(ValueError, match="state.json") as err:
        load_everything(run)
    assert fragment in str(err.value)


BAD_RNG = {
    "torch_float": (
        lambda t: t.update(torch_cpu=t["torch_cpu"].float()),
        "'torch_cpu' must be a 1-D uint8 tensor",
    ),
    "data_gen_int64": (lambda t: t.update(data_gen=t["data_gen"].long()), "'data_gen' must be a 1-D uint8"),
    "torch_2d": (lambda t: t.update(torch_cpu=t["torch_cpu"].view(2, -1)), "must be a 1-D uint8"),
    "torch_short": (lambda t: t.update(torch_cpu=t["torch_cpu"][:10].clone()), "not a valid RNG state"),
    "data_gen_long": (
        lambda t: t.update(data_gen=torch.cat([t["data_gen"], t["data_gen"][:4]])),
        "'data_gen' holds 5060 bytes",
    ),
    "missing": (lambda t: t.pop("data_gen"), "missing keys: data_gen"),
}


@pytest.mark.parametrize("kind", list(BAD_RNG))
def test_rng_state_of_the_wrong_dtype_or_shape_names_the_file(run, kind):
    fn, fragment = BAD_RNG[kind]
    rewrite_tensors(find_checkpoint(run), "rng.safetensors", fn)
    cfg = cfg_of(run)
    torch.manual_seed(0)
    model = MoGETransformer(cfg.model, cfg.moe)
    opt = train_mod.build_optimizer(model, cfg.train)
    state = torch.get_rng_state()
    with pytest.raises(ValueError, match="rng.safetensors") as err:
        load_checkpoint(run, model, opt, torch.Generator())
    assert fragment in str(err.value)
    assert torch.equal(torch.get_rng_state(), state), "nothing was restored"


def test_rng_error_through_resume_is_one_line(run, cli_error, tmp_path):
    rewrite_tensors(find_checkpoint(run), "rng.safetensors", BAD_RNG["torch_float"][0])
    config = tmp_path / "ck.yaml"
    raw = copy.deepcopy(CFG)
    raw["train"].update(out_dir=str(run), resume=True)
    config.write_text(json.dumps(raw))  # JSON is YAML
    line = cli_error(["train", str(config)])
    assert "rng.safetensors: RNG state 'torch_cpu' must be a 1-D uint8 tensor" in line, line


# ============================================================================ LATEST


@pytest.mark.parametrize(
    "content, fragment",
    [
        (b"\xff\xfestep_00000002\n", "LATEST: not UTF-8 text"),
        (b"", "expected a checkpoint folder name"),
        (b"step_2\n", "expected a checkpoint folder name"),
        (b"step_00000002" * 1000, "expected a checkpoint folder name"),  # read bounded, quoted bounded
        (b"folder", None),
    ],
)
def test_latest_that_is_not_a_folder_name_is_one_error_line(run, cli_error, content, fragment):
    latest = run / "checkpoints" / "LATEST"
    if content == b"folder":
        latest.unlink()
        latest.mkdir()
        fragment = "LATEST: not a regular file"
    else:
        latest.write_bytes(content)
    line = cli_error(["generate", str(run), "--prompt", "Hi", "--tokens", "1"])
    assert fragment in line and len(line) < 600, line


# ============================================================================ a full disk


def _no_space(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


def _safetensors_no_space(*args, **kwargs):  # its text on a real full tmpfs (safetensors 0.x)
    raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")


@pytest.mark.parametrize(
    "target, replacement",
    [
        ("save_file", _safetensors_no_space),
        ("save_file", _no_space),
        ("write_manifest", _no_space),
        ("_write_text_atomic", _no_space),  # LATEST's swap: the new folder is complete, LATEST unchanged
    ],
)
def test_full_disk_while_saving_is_one_line_and_keeps_the_last_checkpoint(
    two_steps, tmp_path, cli_error, monkeypatch, target, replacement
):
    run = tmp_path / "run"
    shutil.copytree(two_steps, run)
    config = tmp_path / "ck.yaml"
    raw = copy.deepcopy(CFG)
    raw["train"].update(out_dir=str(run), resume=True, steps=4)
    config.write_text(json.dumps(raw))
    monkeypatch.setattr(ckpt_mod, target, replacement)
    line = cli_error(["train", str(config)])
    assert (
        line.startswith("error: saving the checkpoint of step 4 in ") and "No space left on device" in line
    ), line
    assert "LATEST still names step_00000002, which is kept" in line, line
    monkeypatch.undo()
    assert find_checkpoint(run).name == "step_00000002" and load_run(run)[2] == 2
    assert not any(p.name.startswith(".tmp") for p in (run / "checkpoints").iterdir())


def test_a_signed_config_too_large_for_this_machine_is_refused_before_building(run, cli_error):
    edit_state(find_checkpoint(run), lambda s: s["config"]["model"].update(max_seq_len=10**12))
    line = cli_error(["generate", str(run), "--prompt", "Hi", "--tokens", "1"])
    assert "state.json: needs at least" in line and "RoPE tables" in line, line


# ============================================================================ any single bit flip


@pytest.mark.parametrize(
    "name",
    ["state.json", "state.json.sha256", SHARD, "rng.safetensors"],
)
def test_any_single_bit_flip_in_any_file_is_refused(two_steps, tmp_path, name):
    """Seeded sample of bit positions across each file (the header, the middle, the end)."""
    gen = torch.Generator().manual_seed(len(name))
    src = find_checkpoint(two_steps)
    size = (src / name).stat().st_size
    positions = {
        0,
        size - 1,
        *torch.randint(0, size * 8, (6,), generator=gen).div(8, rounding_mode="floor").tolist(),
    }
    for i, pos in enumerate(sorted(positions)):
        run = tmp_path / f"r{i}"
        shutil.copytree(two_steps, run)
        file = find_checkpoint(run) / name
        data = bytearray(file.read_bytes())
        data[pos] ^= 1 << (pos % 8)
        file.write_bytes(bytes(data))
        with pytest.raises((ValueError, FileNotFoundError), match=r"state\.json|" + name.replace(".", r"\.")):
            load_everything(run)
