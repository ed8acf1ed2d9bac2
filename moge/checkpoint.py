"""Crash-safe checkpoints in safetensors (no pickle), and loading a finished run.

Layout of one run directory (the evaluator relies on it):

    <run_dir>/checkpoints/step_00000600/   one folder per saved step (8-digit step)
        model.safetensors       model.state_dict() (persistent buffers included)
        optimizer.safetensors   "state.<param name>.<key>" tensors; param groups as JSON metadata
        rng.safetensors         "torch_cpu" and "data_gen" RNG states (uint8 tensors)
        state.json              step, resolved config, and size + sha256 of the three files
    <run_dir>/checkpoints/LATEST  the newest complete checkpoint folder's name

A checkpoint is written into a temporary folder, every file and the folder are fsynced,
and only then is it renamed into place and LATEST swapped, so a crash at any moment
leaves the previous good checkpoint readable.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import uuid
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from moge.config import RunConfig, config_from_dict, config_to_dict

CHECKPOINTS = "checkpoints"
LATEST = "LATEST"
FILES = ("model.safetensors", "optimizer.safetensors", "rng.safetensors")
_STEP_DIR = re.compile(r"^step_(\d{8,})$")
_TMP_PREFIX = ".tmp-"
_MAX_LISTED = 8  # keys named in one error message


def step_dirname(step: int) -> str:
    return f"step_{step:08d}"


# ---------------------------------------------------------------- durable writes


def _fsync_path(path: Path) -> None:
    """fsync a file or (where the OS allows opening one) a folder."""
    flags = os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) if path.is_dir() else os.O_RDONLY
    try:
        fd = os.open(path, flags)
    except OSError:
        if path.is_dir():  # e.g. Windows cannot open folders; the rename is still atomic
            return
        raise
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _unique(root: Path, stem: str) -> Path:
    """A fresh temporary name under root (mkdtemp/mkstemp would force 0700/0600 modes)."""
    return root / f"{_TMP_PREFIX}{stem}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def _write_text_atomic(path: Path, text: str) -> None:
    tmp = _unique(path.parent, path.name)
    try:
        with open(tmp, "x", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_path(path.parent)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# ---------------------------------------------------------------- optimizer <-> tensors


def _param_names(model: nn.Module) -> dict[int, str]:
    return {id(p): name for name, p in model.named_parameters()}


def _group_names(model: nn.Module, optimizer: torch.optim.Optimizer) -> list[list[str]]:
    """Parameter names of every param group, in the optimizer's order."""
    names = _param_names(model)
    out = []
    for i, group in enumerate(optimizer.param_groups):
        if any(id(p) not in names for p in group["params"]):
            raise ValueError(f"optimizer: param group {i} holds parameters that are not in the model")
        out.append([names[id(p)] for p in group["params"]])
    return out


def _optimizer_tensors(model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
    """AdamW state as flat tensors "state.<name>.<key>" plus JSON metadata of the groups."""
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, Any] = {}
    groups = []
    for group, names in zip(optimizer.param_groups, _group_names(model, optimizer)):
        groups.append({**{k: v for k, v in group.items() if k != "params"}, "params": names})
        for p, name in zip(group["params"], names):
            for key, value in optimizer.state.get(p, {}).items():
                if isinstance(value, torch.Tensor):
                    tensors[f"state.{name}.{key}"] = value.detach().cpu().contiguous()
                else:
                    scalars[f"{name}.{key}"] = value
    meta = {"param_groups": json.dumps(groups), "scalars": json.dumps(scalars)}
    return tensors, meta


def _restore_optimizer(
    model: nn.Module, optimizer: torch.optim.Optimizer, tensors: dict, meta: dict, file: Path
) -> None:
    try:
        saved_groups = json.loads(meta["param_groups"])
        scalars = json.loads(meta.get("scalars", "{}"))
    except (KeyError, TypeError, json.JSONDecodeError) as err:
        raise ValueError(f"{file}: param_groups metadata is missing or not JSON ({err})") from err
    current = _group_names(model, optimizer)
    if [g["params"] for g in saved_groups] != current:
        saved_names = {n for g in saved_groups for n in g["params"]}
        now_names = {n for names in current for n in names}
        missing, extra = sorted(now_names - saved_names), sorted(saved_names - now_names)
        raise ValueError(
            f"{file}: the saved param groups do not match this optimizer's "
            f"(missing keys: {_list(missing) or '-'}; unexpected keys: {_list(extra) or '-'}; "
            f"saved {[len(g['params']) for g in saved_groups]} per group, now {[len(c) for c in current]})"
        )
    state: dict[int, dict[str, Any]] = {}
    index = {name: i for i, name in enumerate(n for names in current for n in names)}
    used = set()
    for name, i in index.items():
        prefix = f"state.{name}."
        entry = {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
        used.update(prefix + k for k in entry)
        entry.update({k[len(name) + 1 :]: v for k, v in scalars.items() if k.startswith(name + ".")})
        if entry:
            state[i] = entry
    extra = sorted(set(tensors) - used)
    if extra:
        raise ValueError(f"{file}: unexpected keys (no such parameter): {_list(extra)}")
    groups = []
    for group, names in zip(saved_groups, current):
        g = {**group, "params": [index[n] for n in names]}
        if isinstance(g.get("betas"), list):
            g["betas"] = tuple(g["betas"])
        groups.append(g)
    optimizer.load_state_dict({"state": state, "param_groups": groups})


# ---------------------------------------------------------------- saving


def _list(keys: list[str]) -> str:
    shown = ", ".join(keys[:_MAX_LISTED])
    return shown + (f" ... ({len(keys)} in all)" if len(keys) > _MAX_LISTED else "")


def _save_tensors(tensors: dict[str, torch.Tensor], path: Path, metadata: dict | None = None) -> None:
    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(path), metadata=metadata)
    _fsync_path(path)


def _step_dirs(root: Path) -> list[tuple[int, Path]]:
    """(step, folder) of every complete-looking checkpoint under root, oldest first."""
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := _STEP_DIR.match(p.name))]
    return sorted(found)


def _prune(root: Path, keep_last: int, latest: str) -> None:
    dirs = _step_dirs(root)
    for _, path in dirs[: max(len(dirs) - keep_last, 0)]:
        if path.name != latest:
            shutil.rmtree(path, ignore_errors=True)


def _remove_stale_temps(root: Path) -> None:
    # Left behind only by a crash mid-save; never referenced by LATEST.
    for path in root.glob(_TMP_PREFIX + "*"):
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)


def _write_checkpoint_files(folder: Path, step, model, optimizer, data_gen, cfg, extra_rng=None) -> None:
    _save_tensors(model.state_dict(), folder / FILES[0])
    opt_tensors, opt_meta = _optimizer_tensors(model, optimizer)
    _save_tensors(opt_tensors, folder / FILES[1], metadata=opt_meta)
    rng = {"torch_cpu": torch.get_rng_state(), "data_gen": data_gen.get_state(), **(extra_rng or {})}
    _save_tensors(rng, folder / FILES[2])
    files = {
        name: {"bytes": (folder / name).stat().st_size, "sha256": _sha256(folder / name)} for name in FILES
    }
    state = {
        "step": step,
        "config": config_to_dict(cfg),
        "rng": {"file": FILES[2], "tensors": sorted(rng)},
        "files": files,
    }
    with open(folder / "state.json", "w", encoding="utf-8") as f:
        json.dump(state, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    _fsync_path(folder)


def save_checkpoint(
    run_dir: str | Path,
    step: int,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    data_gen: torch.Generator,
    cfg: RunConfig,
    keep_last: int,
    extra_rng: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Write checkpoints/step_<step>/ atomically, point LATEST at it, keep the newest keep_last.

    extra_rng: more RNG state tensors for rng.safetensors (a distributed run stores every
    rank's torch RNG as torch_cpu_rank<r>). Returns the checkpoint folder. On any error the
    temporary folder is removed and the previous checkpoints and LATEST are untouched.
    """
    if keep_last < 1:
        raise ValueError(f"train.keep_last: must be >= 1, got {keep_last}")
    root = Path(run_dir) / CHECKPOINTS
    root.mkdir(parents=True, exist_ok=True)
    _remove_stale_temps(root)
    final = root / step_dirname(step)
    tmp = _unique(root, final.name)
    tmp.mkdir()
    try:
        _write_checkpoint_files(tmp, step, model, optimizer, data_gen, cfg, extra_rng)
        if final.exists():  # the same step saved again: os.replace cannot overwrite a folder
            os.replace(final, _unique(root, "old"))
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _fsync_path(root)
    _write_text_atomic(root / LATEST, final.name + "\n")
    _remove_stale_temps(root)
    _prune(root, keep_last, final.name)
    return final


# ---------------------------------------------------------------- locating and reading


def find_checkpoint(path: str | Path) -> Path:
    """A checkpoint folder from a checkpoint folder, a run dir or its checkpoints/ folder."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such run or checkpoint folder")
    if (path / "state.json").exists():
        return path
    root = path if (path / LATEST).exists() else path / CHECKPOINTS
    latest_file = root / LATEST
    if not latest_file.exists():
        raise FileNotFoundError(
            f"{path}: no checkpoint found (neither {path / 'state.json'} nor {latest_file})"
        )
    name = latest_file.read_text(encoding="utf-8").strip()
    if not _STEP_DIR.match(name):
        raise ValueError(f"{latest_file}: expected a checkpoint folder name like step_00000600, got {name!r}")
    folder = root / name
    if not (folder / "state.json").exists():
        raise FileNotFoundError(f"{latest_file}: names {folder}, which has no state.json")
    return folder


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The folder LATEST names in run_dir/checkpoints, or None when there is none."""
    if not (Path(run_dir) / CHECKPOINTS / LATEST).exists():
        return None
    return find_checkpoint(run_dir)


def _read_state(folder: Path) -> dict:
    file = folder / "state.json"
    try:
        state = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{file}: not a readable JSON checkpoint state ({err})") from err
    for key in ("step", "config", "files"):
        if not isinstance(state, dict) or key not in state:
            raise ValueError(f"{file}: the key {key!r} is missing")
    return state


def _verify_file(folder: Path, name: str, state: dict) -> Path:
    file = folder / name
    if not file.exists():
        raise FileNotFoundError(f"{file}: missing from the checkpoint")
    expected = state["files"].get(name)
    if expected is not None:
        size = file.stat().st_size
        if size != expected["bytes"]:
            raise ValueError(
                f"{file}: truncated or corrupted: {size} bytes, state.json says {expected['bytes']}"
            )
        if _sha256(file) != expected["sha256"]:
            raise ValueError(f"{file}: corrupted: its sha256 differs from the one in state.json")
    return file


def _load_tensors(
    file: Path, device: str | torch.device = "cpu", metadata: bool = False
) -> tuple[dict, dict]:
    """(tensors, metadata if asked) of a safetensors file; a decoding problem -> ValueError naming it."""
    try:
        tensors = load_file(str(file), device=str(device))
        meta = {}
        if metadata:
            with safe_open(str(file), framework="pt") as f:
                meta = f.metadata() or {}
    except (SafetensorError, OSError, RuntimeError, ValueError) as err:
        raise ValueError(f"{file}: not a readable safetensors file ({err})") from err
    return tensors, meta


def _check_state_dict(file: Path, saved: dict, model: nn.Module) -> None:
    expected = model.state_dict()
    missing = sorted(set(expected) - set(saved))
    extra = sorted(set(saved) - set(expected))
    if missing or extra:
        parts = ([f"missing keys: {_list(missing)}"] if missing else []) + (
            [f"unexpected keys: {_list(extra)}"] if extra else []
        )
        raise ValueError(f"{file}: does not match the model; " + "; ".join(parts))
    wrong = [
        f"{k} saved {tuple(saved[k].shape)} vs model {tuple(v.shape)}"
        for k, v in expected.items()
        if tuple(saved[k].shape) != tuple(v.shape)
    ]
    if wrong:
        raise ValueError(f"{file}: another architecture (shape mismatch): {_list(wrong)}")


def load_checkpoint(
    path_or_run_dir: str | Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    data_gen: torch.Generator | None = None,
    rng_key: str = "torch_cpu",
) -> int:
    """Load model (and optimizer, torch CPU RNG + data generator if given); return the step.

    Accepts a checkpoint folder, a run dir, or a run's checkpoints/ folder (then LATEST).
    rng_key: the saved torch RNG state to restore (e.g. torch_cpu_rank1); torch_cpu when absent.
    """
    folder = find_checkpoint(path_or_run_dir)
    state = _read_state(folder)
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    model_file = _verify_file(folder, FILES[0], state)
    weights, _ = _load_tensors(model_file, device)
    _check_state_dict(model_file, weights, model)
    model.load_state_dict(weights)
    if optimizer is not None:
        opt_file = _verify_file(folder, FILES[1], state)
        tensors, meta = _load_tensors(opt_file, metadata=True)
        _restore_optimizer(model, optimizer, tensors, meta, opt_file)
    if data_gen is not None:
        rng_file = _verify_file(folder, FILES[2], state)
        rng, _ = _load_tensors(rng_file)
        missing = [k for k in ("torch_cpu", "data_gen") if k not in rng]
        if missing:
            raise ValueError(f"{rng_file}: missing keys: {_list(missing)}")
        torch.set_rng_state(rng.get(rng_key, rng["torch_cpu"]))
        data_gen.set_state(rng["data_gen"])
    return int(state["step"])


def checkpoint_config(path_or_run_dir: str | Path) -> RunConfig:
    """The resolved config stored in the newest (or the given) checkpoint."""
    folder = find_checkpoint(path_or_run_dir)
    return config_from_dict(_read_state(folder)["config"], source=str(folder / "state.json"))


def load_run(
    run_dir: str | Path, map_location: str | torch.device = "cpu"
) -> tuple[nn.Module, RunConfig, int]:
    """(model in eval mode, its config, step) of a run's newest checkpoint."""
    from moge.model import MoGETransformer  # model imports config only; keep this module light

    cfg = checkpoint_config(run_dir)
    model = MoGETransformer(cfg.model, cfg.moe).to(map_location)
    step = load_checkpoint(run_dir, model)
    return model.eval(), cfg, step
