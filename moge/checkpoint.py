"""Crash-safe checkpoints in safetensors (no pickle), and loading a finished run.

Layout of one run directory (the evaluator relies on it):

    <run_dir>/checkpoints/step_00000600/   one folder per saved step (8-digit step)
        model.safetensors       model.state_dict() (persistent buffers included)
        optimizer.safetensors   "state.<param name>.<key>" tensors; param groups as JSON metadata
        rng.safetensors         "torch_cpu" and "data_gen" RNG states (uint8 tensors)
        state.json              step, resolved config, and size + sha256 of every other file
        state.json.sha256       sha256 of state.json itself (a flip in state.json cannot hide)
    <run_dir>/checkpoints/LATEST  the newest complete checkpoint folder's name

Loading verifies the whole folder first (`moge.manifest.verify_checkpoint`): the digest of
state.json, its schema and value ranges, and the size and sha256 of every file it lists;
a file in the folder that it does not list, or a listed file that is missing, is an
error. A sharded layout reuses this by listing its shard files in the same manifest
(`moge.manifest.write_manifest`).

A checkpoint is written into a temporary folder, every file and the folder are fsynced,
and only then is it renamed into place and LATEST swapped, so a crash at any moment
leaves the previous good checkpoint readable.
"""

from __future__ import annotations

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
from moge.manifest import STATE, read_state, verify_checkpoint, write_manifest

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
    _check_groups(file, saved_groups, scalars)
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


def _check_groups(file: Path, groups: Any, scalars: Any) -> None:
    """The saved param groups: a list of mappings with parameter names and sane settings."""
    if not isinstance(groups, list) or not isinstance(scalars, dict):
        raise ValueError(f"{file}: param_groups must be a JSON list and scalars a JSON object")
    for i, g in enumerate(groups):
        if not isinstance(g, dict) or not isinstance(g.get("params"), list):
            raise ValueError(f"{file}: param group {i} must be a mapping with a 'params' list")
        if not all(isinstance(n, str) for n in g["params"]):
            raise ValueError(f"{file}: param group {i}: 'params' must list parameter names")
        for key in ("lr", "eps", "weight_decay"):
            v = g.get(key)
            if v is not None and (
                not isinstance(v, (int, float)) or isinstance(v, bool) or not 0 <= v < float("inf")
            ):
                raise ValueError(
                    f"{file}: param group {i}: {key} must be a finite number >= 0, got {str(v)[:40]}"
                )
        betas = g.get("betas")
        if betas is not None and not (
            isinstance(betas, list)
            and len(betas) == 2
            and all(isinstance(b, (int, float)) and 0 <= b < 1 for b in betas)
        ):
            raise ValueError(
                f"{file}: param group {i}: betas must be two numbers in [0, 1), got {str(betas)[:60]}"
            )


# ---------------------------------------------------------------- saving


def _list(keys: list[str]) -> str:
    shown = ", ".join(keys[:_MAX_LISTED])
    return shown + (f" ... ({len(keys)} in all)" if len(keys) > _MAX_LISTED else "")


def _save_tensors(tensors: dict[str, torch.Tensor], path: Path, metadata: dict | None = None) -> None:
    try:
        save_file(
            {k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(path), metadata=metadata
        )
    except SafetensorError as err:  # e.g. a full disk; an OSError is what the CLI reports
        code = re.search(r"(?:code: |os error )(\d+)", str(err))  # safetensors wraps the OS error in its text
        if code:
            raise OSError(int(code.group(1)), os.strerror(int(code.group(1))), str(path)) from err
        raise OSError(f"{path}: writing failed ({str(err)[:200]})") from err
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
    state = {"step": step, "config": config_to_dict(cfg), "rng": {"file": FILES[2], "tensors": sorted(rng)}}
    write_manifest(folder, state)
    _fsync_path(folder)


def _os_reason(err: OSError) -> str:
    return err.strerror or str(err)[:300]


def _kept(root: Path) -> str:
    try:
        return f"{root / LATEST} still names {_read_latest(root / LATEST)}, which is kept"
    except (OSError, ValueError):
        return "no earlier checkpoint exists"


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
        _fsync_path(root)
        _write_text_atomic(root / LATEST, final.name + "\n")
    except OSError as err:  # a full disk, a quota: one line saying what is kept
        shutil.rmtree(tmp, ignore_errors=True)
        raise OSError(f"saving the checkpoint of step {step} in {root} failed ({_os_reason(err)}); "
                      f"{_kept(root)}") from err  # fmt: skip
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _remove_stale_temps(root)
    _prune(root, keep_last, final.name)
    return final


# ---------------------------------------------------------------- locating and reading


def _read_latest(latest_file: Path) -> str:
    """The folder name in LATEST (bounded read; bytes that are not UTF-8 -> ValueError naming it)."""
    if not latest_file.is_file():
        raise ValueError(f"{latest_file}: not a regular file")
    with open(latest_file, "rb") as f:
        data = f.read(256)
    try:
        name = data.decode("utf-8").strip()
    except UnicodeDecodeError:
        raise ValueError(
            f"{latest_file}: not UTF-8 text (expected a folder name like step_00000600)"
        ) from None
    if not _STEP_DIR.match(name):
        shown = name[:40] + ("..." if len(name) > 40 else "")
        raise ValueError(
            f"{latest_file}: expected a checkpoint folder name like step_00000600, got {shown!r}"
        )
    return name


def find_checkpoint(path: str | Path) -> Path:
    """A checkpoint folder from a checkpoint folder, a run dir or its checkpoints/ folder."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such run or checkpoint folder")
    if (path / STATE).exists():
        return path
    root = path if (path / LATEST).exists() else path / CHECKPOINTS
    latest_file = root / LATEST
    if not latest_file.exists():
        raise FileNotFoundError(f"{path}: no checkpoint found (neither {path / STATE} nor {latest_file})")
    folder = root / _read_latest(latest_file)
    if not (folder / STATE).exists():
        raise FileNotFoundError(f"{latest_file}: names {folder}, which has no state.json")
    return folder


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The folder LATEST names in run_dir/checkpoints, or None when there is none."""
    if not (Path(run_dir) / CHECKPOINTS / LATEST).exists():
        return None
    return find_checkpoint(run_dir)


def step_folders(root: str | Path) -> list[Path]:
    """Every step_<N> folder under a checkpoints/ folder, oldest first (complete or not)."""
    return [path for _, path in _step_dirs(Path(root))]


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
    wrong = [
        f"{k} saved {saved[k].dtype} vs model {v.dtype}"
        for k, v in expected.items()
        if saved[k].dtype != v.dtype
    ]
    if wrong:
        raise ValueError(f"{file}: dtype mismatch (never cast silently): {_list(wrong)}")


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
    state = verify_checkpoint(folder, FILES)
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    model_file = folder / FILES[0]
    weights, _ = _load_tensors(model_file, device)
    _check_state_dict(model_file, weights, model)
    if optimizer is not None:  # everything is checked before anything is changed
        opt_file = folder / FILES[1]
        tensors, meta = _load_tensors(opt_file, metadata=True)
        _check_optimizer_tensors(opt_file, tensors, model)
    if data_gen is not None:
        rng_file = folder / FILES[2]
        rng, _ = _load_tensors(rng_file)
        _check_rng(rng_file, rng, rng_key)
    model.load_state_dict(weights)
    if optimizer is not None:
        _restore_optimizer(model, optimizer, tensors, meta, opt_file)
    if data_gen is not None:
        try:
            torch.set_rng_state(rng.get(rng_key, rng["torch_cpu"]))
            data_gen.set_state(rng["data_gen"])
        except RuntimeError as err:
            raise ValueError(f"{rng_file}: not a valid RNG state ({str(err)[:200]})") from err
    return state["step"]


def _check_rng(file: Path, rng: dict, rng_key: str) -> None:
    missing = [k for k in ("torch_cpu", "data_gen") if k not in rng]
    if missing:
        raise ValueError(f"{file}: missing keys: {_list(missing)}")
    for key in ("data_gen", rng_key if rng_key in rng else "torch_cpu"):
        t = rng[key]
        if t.dtype != torch.uint8 or t.dim() != 1:
            raise ValueError(
                f"{file}: RNG state {key!r} must be a 1-D uint8 tensor, got {t.dtype} {tuple(t.shape)}"
            )


def _check_optimizer_tensors(file: Path, tensors: dict, model: nn.Module) -> None:
    """AdamW moments have their parameter's shape and dtype; step counts are finite and >= 0."""
    params = dict(model.named_parameters())
    for key, t in tensors.items():
        name, _, kind = key[len("state.") :].rpartition(".")
        p = params.get(name)
        if p is None or not key.startswith("state."):
            continue  # _restore_optimizer names unexpected keys
        if kind in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"):
            if t.shape != p.shape or t.dtype != p.dtype:
                raise ValueError(
                    f"{file}: {key} is {t.dtype} {tuple(t.shape)}, the parameter {p.dtype} {tuple(p.shape)}"
                )
            if not bool(torch.isfinite(t).all()) or (kind != "exp_avg" and bool((t < 0).any())):
                raise ValueError(f"{file}: {key} holds NaN/Inf or a negative second moment")
        elif kind == "step" and (
            t.numel() != 1 or not t.is_floating_point() or not bool(torch.isfinite(t).all()) or float(t) < 0
        ):
            raise ValueError(f"{file}: {key} must be one finite number >= 0, got {t.dtype} {tuple(t.shape)}")


def checkpoint_config(path_or_run_dir: str | Path) -> RunConfig:
    """The resolved config stored in the newest (or the given) checkpoint."""
    folder = find_checkpoint(path_or_run_dir)
    return config_from_dict(read_state(folder)["config"], source=str(folder / "state.json"))


def load_run(
    run_dir: str | Path, map_location: str | torch.device = "cpu"
) -> tuple[nn.Module, RunConfig, int]:
    """(model in eval mode, its config, step) of a run's newest checkpoint."""
    from moge.limits import check_model_fits
    from moge.model import MoGETransformer  # model imports config only; keep this module light

    cfg = checkpoint_config(run_dir)
    check_model_fits(cfg, f"{find_checkpoint(run_dir) / STATE}", str(torch.device(map_location).type))
    model = MoGETransformer(cfg.model, cfg.moe).to(map_location)
    step = load_checkpoint(run_dir, model)
    return model.eval(), cfg, step
