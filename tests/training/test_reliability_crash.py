"""Reliability of runs: damaged checkpoints, save order, divergence, SIGKILL + resume, no pickle.

Also checks that every row of docs/reliability.md names tests that exist.
"""

from __future__ import annotations

import ast
import copy
import hashlib
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

import moge.training.checkpoint as ckpt_mod
import moge.training.durable as durable_mod
import moge.training.loop as train_mod
import moge.training.manifest as manifest_mod
from moge.cli import main
from moge.model import MoGETransformer
from moge.training import NonFiniteLossError
from moge.training.checkpoint import find_checkpoint, load_run, read_tensors, save_checkpoint
from moge.training.config import config_from_dict

pytestmark = pytest.mark.usefixtures("one_thread")

ROOT = Path(__file__).resolve().parents[2]
SHARD = "shard-00001-model-00001-of-00001.safetensors"  # the one shard of a one-process run

# ============================================================================ checkpoints

TRAIN_CFG = {
    "name": "rel",
    "model": {"d_model": 32, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "max_seq_len": 32},
    "moe": {"num_experts": 8, "num_groups": 4, "top_k": 4, "expert_hidden": 16, "num_shared_experts": 1,
            "learned_expert_scale": True},
    "data": {"seq_len": 32},
    "train": {"steps": 24, "batch_size": 4, "lr": 3e-3, "min_lr": 3e-4, "warmup_steps": 2, "log_every": 100,
              "eval_every": 0, "eval_batches": 1, "save_every": 5, "keep_last": 2, "threads": 1},
}  # fmt: skip


def run_cfg(out_dir: Path, **train_kw):
    raw = copy.deepcopy(TRAIN_CFG)
    raw["train"].update(out_dir=str(out_dir), **train_kw)
    return config_from_dict(raw)


@pytest.fixture(scope="module")
def small_run(tmp_path_factory) -> Path:
    """A 2-step run (one checkpoint); tests copy it before damaging it."""
    run = tmp_path_factory.mktemp("small") / "run"
    n = torch.get_num_threads()
    train_mod.train(run_cfg(run, steps=2, save_every=0), progress=False)
    torch.set_num_threads(n)
    return run


def write_signed_state(folder: Path, state) -> None:
    """Write state.json (a dict, or raw bytes/str) with a matching state.json.sha256: an edit, not damage."""
    if isinstance(state, dict):
        state = json.dumps(state)
    data = state.encode() if isinstance(state, str) else state
    (folder / "state.json").write_bytes(data)
    (folder / "state.json.sha256").write_text(hashlib.sha256(data).hexdigest() + "\n")


def _record_file(folder: Path, name: str) -> None:
    """Make state.json vouch for the current bytes of `name` (a deliberate swap, not damage)."""
    state = json.loads((folder / "state.json").read_text())
    data = (folder / name).read_bytes()
    state["files"][name] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    write_signed_state(folder, state)


def _damage(run: Path, kind: str) -> str:
    """Break the run's checkpoint one way; return what the error must mention."""
    folder = find_checkpoint(run)
    model_file = folder / SHARD
    if kind in ("truncated", "truncated_unrecorded"):
        model_file.write_bytes(model_file.read_bytes()[:1000])
        if kind == "truncated_unrecorded":  # its entry dropped: an unverifiable file is refused
            state = json.loads((folder / "state.json").read_text())
            del state["files"][SHARD]
            write_signed_state(folder, state)
            return f"{SHARD}"  # in the folder but not listed by state.json
        return f"{SHARD}: truncated or corrupted"
    if kind == "bit_flip":
        data = bytearray(model_file.read_bytes())
        data[-3] ^= 0x10
        model_file.write_bytes(bytes(data))
        return f"{SHARD}: corrupted: its sha256 differs"
    if kind == "other_architecture":
        other = copy.deepcopy(TRAIN_CFG)
        other["model"]["d_model"] = 48
        cfg = config_from_dict(other)
        sd = MoGETransformer(cfg.model, cfg.moe).state_dict()
        save_file({f"model.{k}": v for k, v in sd.items()}, str(model_file))
        _record_file(folder, SHARD)
        return ("another architecture (shape mismatch): "
                "embed.weight saved (256, 48) vs model (256, 32)")  # fmt: skip
    if kind == "missing_and_extra_keys":
        weights = load_file(str(model_file))
        del weights["model.norm.weight"]
        weights["model.blocks.0.ffn.extra_E"] = torch.zeros(8)
        save_file(weights, str(model_file))
        _record_file(folder, SHARD)
        return "missing keys: norm.weight; unexpected keys: blocks.0.ffn.extra_E"
    if kind == "pickle_instead":  # a torch.save file under the safetensors name
        torch.save({"x": torch.zeros(2)}, model_file)
        _record_file(folder, SHARD)
        return f"{SHARD}: not a readable safetensors file"
    if kind == "missing_file":
        model_file.unlink()
        return f"{SHARD}: missing from the checkpoint"
    if kind == "state_not_json":
        write_signed_state(folder, "{not json")
        return "state.json: not a readable JSON checkpoint state"
    if kind == "state_bad_config":
        state = json.loads((folder / "state.json").read_text())
        state["config"]["moe"]["top_k"] = 3
        write_signed_state(folder, state)
        return "moe.top_k: "
    if kind == "latest_garbage":
        (run / "checkpoints" / "LATEST").write_text("../../etc\n")
        return "LATEST: expected a checkpoint folder name"
    if kind == "latest_dangling":
        (run / "checkpoints" / "LATEST").write_text("step_00000999\n")
        return "step_00000999, which has no state.json"
    if kind == "no_checkpoint":
        shutil.rmtree(run / "checkpoints")
        return "LATEST"
    raise KeyError(kind)


DAMAGE = ["truncated", "truncated_unrecorded", "bit_flip", "other_architecture", "missing_and_extra_keys",
          "pickle_instead", "missing_file", "state_not_json", "state_bad_config", "latest_garbage",
          "latest_dangling", "no_checkpoint"]  # fmt: skip


@pytest.mark.parametrize("kind", DAMAGE)
def test_damaged_checkpoint_is_one_error_line_in_generate_and_eval(small_run, tmp_path, cli_error, kind):
    run = tmp_path / "run"
    shutil.copytree(small_run, run)
    fragment = _damage(run, kind)
    before = sorted(p.name for p in run.iterdir())
    for argv in (
        ["generate", str(run), "--prompt", "Hi", "--tokens", "2"],
        ["eval", str(run), "--batches", "1"],
    ):
        line = cli_error(argv)
        assert fragment in line and str(run) in line, line
    assert sorted(p.name for p in run.iterdir()) == before, "a failed load writes nothing"


def test_resume_into_another_architecture_names_the_field(small_run, tmp_path, cli_error):
    run = tmp_path / "run"
    shutil.copytree(small_run, run)
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({**TRAIN_CFG, "name": "rel"}))
    argv = ["train", str(config), f"train.out_dir={run}", "train.resume=true", "moe.num_experts=16"]
    line = cli_error(argv)
    assert line.startswith("error: moe.num_experts: differs from the checkpoint"), line


def test_save_fsyncs_every_file_and_folder_before_each_rename(small_run, tmp_path, monkeypatch):
    # The protocol: files written into .tmp-step_N/, each fsynced, the folder fsynced,
    # renamed, checkpoints/ fsynced; LATEST written to a temp file, fsynced, renamed.
    events: list[tuple[str, str]] = []

    class RecordingOs:  # checkpoint's view of os
        def __getattr__(self, name):
            return getattr(os, name)

        @staticmethod
        def fsync(fd):
            events.append(("fsync", Path(os.readlink(f"/proc/self/fd/{fd}")).name))
            os.fsync(fd)

        @staticmethod
        def replace(src, dst):
            events.append(("replace", f"{Path(src).name}->{Path(dst).name}"))
            os.replace(src, dst)

    if not Path("/proc/self/fd").is_dir():
        pytest.skip("needs /proc to name fsynced file descriptors")
    model, cfg, _ = load_run(small_run)
    opt = train_mod.build_optimizer(model, cfg.train)
    monkeypatch.setattr(ckpt_mod, "os", RecordingOs())
    monkeypatch.setattr(durable_mod, "os", RecordingOs())  # fsyncs folders, swaps LATEST
    monkeypatch.setattr(manifest_mod, "os", RecordingOs())  # writes and fsyncs state.json
    save_checkpoint(tmp_path, 7, model, opt, torch.Generator(), cfg, keep_last=1)
    names = [e[1] for e in events]
    folder_swap = next(
        i for i, (k, n) in enumerate(events) if k == "replace" and n.endswith("->step_00000007")
    )
    latest_swap = next(i for i, (k, n) in enumerate(events) if k == "replace" and n.endswith("->LATEST"))
    for file in (SHARD, "rng.safetensors", "state.json", "state.json.sha256"):
        assert names.index(file) < folder_swap, file
    assert names[folder_swap - 1].startswith(".tmp-step_00000007"), "the folder itself, last"
    assert events[folder_swap + 1] == ("fsync", "checkpoints"), "the rename is made durable"
    assert names[latest_swap - 1].startswith(".tmp-LATEST"), "LATEST's temp file before its rename"
    assert events[latest_swap + 1] == ("fsync", "checkpoints")


# ========================================================================= NaN mid-run


def _hook_model(monkeypatch, hook) -> None:
    """Call hook(model, step) before every training forward (the trainer builds the model)."""
    real_build = train_mod.build_optimizer

    def build_and_hook(model, tc):
        calls = {"n": 0}

        def pre(module, args):
            if module.training:
                calls["n"] += 1
                hook(module, calls["n"])

        model.register_forward_pre_hook(pre)
        return real_build(model, tc)

    monkeypatch.setattr(train_mod, "build_optimizer", build_and_hook)


def _all_finite(folder: Path) -> bool:
    weights = [t for k, t in read_tensors(folder).items() if k.startswith("model.")]
    return bool(weights) and all(bool(torch.isfinite(t).all()) for t in weights)


@pytest.mark.parametrize(
    "target, value, fragment",
    [
        (
            "experts",
            float("nan"),
            r"step 7: .*layer 0 \(MoE\): non-finite hidden output.*blocks\.0\.ffn\.experts\.",
        ),
        (
            "router",
            float("inf"),
            r"step 7: .*layer 1 \(MoE\): non-finite router scores.*blocks\.1\.ffn\.router\.",
        ),
    ],
)
def test_nonfinite_loss_exits_1_naming_step_and_layer(
    tmp_path, cli_error, monkeypatch, target, value, fragment
):
    def poison(model, step):
        if step == 7:
            layer = model.blocks[0 if target == "experts" else 1].ffn
            with torch.no_grad():
                for p in (layer.experts if target == "experts" else layer.router).parameters():
                    p.fill_(value)

    _hook_model(monkeypatch, poison)
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(TRAIN_CFG))
    run = tmp_path / "run"
    line = cli_error(["train", str(config), f"train.out_dir={run}"], expected_code=1)
    assert re.search(fragment, line), line
    assert "nothing is saved after it: the last checkpoint written, if any, is kept" in line
    assert find_checkpoint(run).name == "step_00000005" and _all_finite(find_checkpoint(run))
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["LATEST", "step_00000005"]


def test_nan_in_a_buffer_with_a_finite_loss_writes_no_checkpoint(tmp_path, monkeypatch):
    # A NaN balance bias only shifts selection (gates use the raw scores): the loss stays
    # finite, and the save-time check is what keeps the NaN out of checkpoints.
    def poison(model, step):
        if step == 7:
            model.blocks[1].ffn.balance_bias_E[3] = float("nan")

    _hook_model(monkeypatch, poison)
    run = tmp_path / "run"
    cfg = run_cfg(run)
    cfg.moe.bias_update_rate = 0.01
    with pytest.raises(NonFiniteLossError, match=r"^step 10: blocks\.1\.ffn\.balance_bias_E holds NaN"):
        train_mod.train(cfg, progress=False)
    losses = [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == 10 and all(map(math.isfinite, losses)), "steps 7-10 had a finite loss"
    assert find_checkpoint(run).name == "step_00000005" and _all_finite(find_checkpoint(run))


# ================================================================================ SIGKILL

# A shorter run than TRAIN_CFG's: saves at steps 4, 8, 12 and the final 14 (keep_last=2).
# The save of step 12 is the one interrupted, so step 8 is the last complete checkpoint.
SIGKILL_TRAIN = {"steps": 14, "save_every": 4}

# Runs in a child process: pauses a real `moge train` at one point of a save (by patching
# the child's own moge.training.checkpoint, so production code has no test hooks), writes a marker
# and sleeps until the test SIGKILLs it.
PAUSING_CHILD = r"""
import os, sys, time
from pathlib import Path
import moge.training.checkpoint as ckpt
import moge.training.durable as durable
from moge.cli import main

where, target, marker = sys.argv[1], ckpt.step_dirname(int(sys.argv[2])), Path(sys.argv[3])

def pause():
    marker.write_text(where)
    time.sleep(600)

if where == "mid_file":  # the shards written, half of rng.safetensors, inside .tmp-step_N/
    real_save = ckpt.save_file
    def save_file(tensors, path, metadata=None):
        real_save(tensors, path, metadata=metadata)
        p = Path(path)
        if p.name == "rng.safetensors" and p.parent.name.startswith(".tmp-" + target):
            p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])
            pause()
    ckpt.save_file = save_file
elif where == "latest_swap":  # step_N/ renamed into place, LATEST's temp file written
    class PausingOs:
        def __getattr__(self, name):
            return getattr(os, name)
        @staticmethod
        def replace(src, dst):
            if Path(dst).name == "LATEST" and Path(src).read_text().strip() == target:
                pause()
            os.replace(src, dst)
    ckpt.os = durable.os = PausingOs()
sys.exit(main(sys.argv[4:]))
"""


def _spawn(args: list[str], cwd: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    with open(cwd / "child.log", "w") as log:
        return subprocess.Popen(
            [sys.executable, *args], cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT
        )


def _wait_until(child: subprocess.Popen, ready, cwd: Path, timeout: float = 180.0) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        if child.poll() is not None or time.monotonic() > deadline:
            child.kill()
            child.wait()
            log = (cwd / "child.log").read_text()
            raise AssertionError(f"the child exited or stalled (rc {child.returncode}):\n{log}")
        time.sleep(0.01)


def _last_step(metrics: Path) -> int:
    if not metrics.exists():
        return 0
    steps = [0]
    for line in metrics.read_text().splitlines():
        try:
            steps.append(json.loads(line)["step"])
        except (json.JSONDecodeError, KeyError):
            pass  # the line being written
    return max(steps)


def _final_state(run: Path) -> dict:
    return read_tensors(run)


def _start_and_kill(where: str, folder: Path) -> int:
    """Run one case's `moge train` (folder/rel.yaml into folder/run), SIGKILL it at its
    point and return its exit status."""
    raw = copy.deepcopy(TRAIN_CFG)
    raw["train"].update(SIGKILL_TRAIN)
    (folder / "rel.yaml").write_text(yaml.safe_dump(raw))
    train_argv = ["train", str(folder / "rel.yaml"), f"train.out_dir={folder / 'run'}"]
    if where == "mid_run":  # the real CLI, killed at some step after the save of step 4
        child = _spawn(["-m", "moge", *train_argv], folder)
        _wait_until(child, lambda: _last_step(folder / "run" / "metrics.jsonl") >= 6, folder)
    else:  # killed at a chosen point of the save of step 12
        marker = folder / "paused"
        child = _spawn(["-c", PAUSING_CHILD, where, "12", str(marker), *train_argv], folder)
        _wait_until(child, marker.exists, folder)
    child.send_signal(signal.SIGKILL)
    return child.wait(timeout=30)


@pytest.fixture(scope="module")
def killed(request, tmp_path_factory) -> dict[str, tuple[Path, Future]]:
    """where -> (case folder, future of the child's exit status) for the selected cases.

    All children start at once, each watched and killed by a thread of its own: a child
    spends seconds importing torch, and so those seconds overlap instead of adding up.
    """
    name = "test_sigkill_then_resume_gives_the_uninterrupted_weights"
    items = [i for i in request.session.items if getattr(i, "originalname", None) == name]
    folders = {
        w: tmp_path_factory.mktemp(f"sigkill-{w}")
        for w in sorted({i.callspec.params["where"] for i in items})
    }
    with ThreadPoolExecutor(max_workers=max(len(folders), 1)) as pool:
        yield {w: (folder, pool.submit(_start_and_kill, w, folder)) for w, folder in folders.items()}


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> tuple[dict, list]:
    """Final tensors and losses of the SIGKILL_TRAIN run that nothing interrupts."""
    run = tmp_path_factory.mktemp("ref") / "run"
    n = torch.get_num_threads()
    train_mod.train(run_cfg(run, **SIGKILL_TRAIN), progress=False)
    torch.set_num_threads(n)
    records = map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
    losses = [r["loss"] for r in records if r["type"] == "train"]
    return _final_state(run), losses


@pytest.mark.parametrize("where", ["mid_run", "mid_file", "latest_swap"])
def test_sigkill_then_resume_gives_the_uninterrupted_weights(capsys, killed, uninterrupted, where):
    folder, status = killed[where]
    assert status.result() == -signal.SIGKILL
    run = folder / "run"
    root = run / "checkpoints"
    on_disk = sorted(p.name for p in root.iterdir())
    good = find_checkpoint(run)
    assert _all_finite(good) and load_run(run)[2] == int(good.name[5:]) < 14, (
        "the newest good checkpoint loads"
    )
    if where == "mid_file":
        assert good.name == "step_00000008" and any(n.startswith(".tmp-step_00000012") for n in on_disk), (
            on_disk
        )
    if where == "latest_swap":
        assert good.name == "step_00000008", "LATEST still names the previous checkpoint"
        assert {"step_00000012", "step_00000008"} <= set(on_disk) and any(
            n.startswith(".tmp-LATEST") for n in on_disk
        )

    assert main(["train", str(folder / "rel.yaml"), f"train.out_dir={run}", "train.resume=true"]) == 0
    capsys.readouterr()
    final, losses = uninterrupted
    resumed = _final_state(run)
    assert resumed.keys() == final.keys()
    assert all(torch.equal(resumed[k], final[k]) for k in final), "bit-identical weights, optimizer and RNG"
    logged = [
        r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if r["type"] == "train"
    ]
    assert [r["step"] for r in logged] == list(range(1, 15)) and [r["loss"] for r in logged] == losses
    assert sorted(p.name for p in root.iterdir()) == ["LATEST", "step_00000012", "step_00000014"], (
        "keep_last=2"
    )


# ============================================================================ no pickle


def _unsafe_loads(source: str, filename: str) -> list[str]:
    """Calls that could unpickle: torch.load without weights_only=True, yaml.load without a
    safe Loader, yaml.unsafe_load/full_load, pickle/dill/joblib loads, numpy allow_pickle."""
    found = []
    tree = ast.parse(source, filename)
    safe = {"SafeLoader", "CSafeLoader"}
    # Loader classes of this file that subclass a safe one (e.g. moge.training.safeyaml._StrictLoader)
    for node in ast.walk(tree):
        if isinstance(node, ast.ClassDef) and any(
            isinstance(b, ast.Attribute) and b.attr in safe and getattr(b.value, "id", "") == "yaml"
            for b in node.bases
        ):
            safe.add(node.name)
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        func = node.func
        name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
        owner = getattr(func.value, "id", "") if isinstance(func, ast.Attribute) else ""
        kw = {k.arg: k.value for k in node.keywords}
        where = f"{filename}:{node.lineno}"
        is_true = lambda v: isinstance(v, ast.Constant) and v.value is True  # noqa: E731
        if name == "load" and owner == "torch" and not is_true(kw.get("weights_only")):
            found.append(f"{where}: torch.load without weights_only=True")
        elif name == "load" and owner == "yaml":
            loader = kw.get("Loader", node.args[1] if len(node.args) > 1 else None)
            name_of = loader.attr if isinstance(loader, ast.Attribute) else getattr(loader, "id", None)
            if name_of not in safe or (
                isinstance(loader, ast.Name) and name_of in ("SafeLoader", "CSafeLoader")
            ):
                found.append(f"{where}: yaml.load without a safe Loader")
        elif owner == "yaml" and name in (
            "unsafe_load",
            "full_load",
            "load_all",
            "unsafe_load_all",
            "full_load_all",
        ):
            found.append(f"{where}: yaml.{name}")
        elif owner in ("pickle", "cPickle", "dill", "joblib", "_pickle") and name in (
            "load",
            "loads",
            "Unpickler",
        ):
            found.append(f"{where}: {owner}.{name}")
        elif name == "load" and is_true(kw.get("allow_pickle")):
            found.append(f"{where}: load(allow_pickle=True)")
    return found


def test_the_unsafe_load_finder_finds_them():
    bad = (
        "torch.load(f)\ntorch.load(f, weights_only=False)\nyaml.load(s)\nyaml.load(s, Loader=yaml.Loader)\n"
        "yaml.unsafe_load(s)\nyaml.full_load(s)\npickle.loads(b)\nnp.load(f, allow_pickle=True)\n"
        "class Mine(yaml.Loader):\n    pass\nyaml.load(s, Loader=Mine)\nyaml.load(s, Loader=Other)\n"
    )
    assert len(_unsafe_loads(bad, "bad.py")) == 10
    good = (
        "torch.load(f, weights_only=True)\nyaml.safe_load(s)\nyaml.load(s, Loader=yaml.SafeLoader)\nnp.load(f)\n"
        "class Strict(yaml.SafeLoader):\n    pass\nyaml.load(s, Loader=Strict)\n"
    )
    assert _unsafe_loads(good, "good.py") == []


def test_nothing_in_the_package_or_scripts_loads_with_pickle():
    files = sorted((ROOT / "moge").rglob("*.py")) + sorted((ROOT / "scripts").rglob("*.py"))
    assert len(files) > 10
    found = [
        hit for f in files for hit in _unsafe_loads(f.read_text(encoding="utf-8"), str(f.relative_to(ROOT)))
    ]
    assert found == []


# ================================================================== docs/reliability.md


def test_every_row_of_the_reliability_doc_names_tests_that_exist():
    doc = (ROOT / "docs" / "reliability.md").read_text(encoding="utf-8")
    rows = [
        line
        for line in doc.splitlines()
        if line.startswith("| ") and not line.startswith(("| Fault", "|---"))
    ]
    assert len(rows) >= 40
    defined: dict[str, set[str]] = {}
    for row in rows:
        refs = re.findall(r"`([^`\s]+)::(test_\w+)", row)
        assert refs, f"a row without a test: {row[:80]}"
        for file, name in refs:
            assert re.fullmatch(r"tests/(\w+/)?test_\w+\.py", file), (
                f"{file}::{name}: write out the file's path"
            )
            if file not in defined:
                assert (ROOT / file).is_file(), f"{file} (named in docs/reliability.md) does not exist"
                defined[file] = set(
                    re.findall(r"^def (test_\w+)", (ROOT / file).read_text(encoding="utf-8"), re.M)
                )
            assert name in defined[file], f"{file}::{name} (named in docs/reliability.md) does not exist"
