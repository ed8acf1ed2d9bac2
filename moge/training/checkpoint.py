"""Crash-safe sharded checkpoints: torch.distributed.checkpoint (DCP) writing safetensors.

Layout of one run directory (the evaluator relies on it):

    <run_dir>/checkpoints/step_00000600/   one folder per saved step (8-digit step)
        shard-0000R-model-00001-of-00001.safetensors   one per rank R+1 (DCP's
                                HuggingFaceStorageWriter): that rank's pieces of the
                                "model.<name>" and "optim.<name>.<key>" tensors; the
                                header (JSON) records each piece's offset in the whole
                                tensor, so any world size reads back any slice
        rng.safetensors         "torch_cpu" and "data_gen" RNG states (uint8 tensors), and
                                every rank's torch RNG as torch_cpu_rank<r> when there are several
        state.json              step, resolved config, world and mesh, the AdamW param
                                groups, and size + sha256 of every other file
        state.json.sha256       sha256 of state.json itself (a flip in state.json cannot hide)
    <run_dir>/checkpoints/LATEST  the newest complete checkpoint folder's name

No rank gathers the model: each writes its own shards. Nothing is pickled: DCP's own
metadata file (a pickle) is not written; the safetensors headers carry the layout.
A checkpoint is written into a temporary folder, every file and the folder are
fsynced, and only then is it renamed into place and LATEST swapped, so a crash at any
moment (of any rank) leaves the previous good checkpoint readable.

Loading verifies the whole folder first (`verify_checkpoint`, before DCP opens any
file): the digest of state.json, its schema and value ranges, and the size and sha256
of every file it lists (every shard included, through `write_manifest`); a file in the
folder that it does not list, or a listed file that is missing, is an error. The
shards' headers are then checked against the model (names, shapes, dtypes) before DCP
reads them, and the optimizer and RNG state's values after.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import uuid
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed.checkpoint as dcp
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from torch.distributed.checkpoint import HuggingFaceStorageReader, HuggingFaceStorageWriter
from torch.distributed.checkpoint.api import CheckpointException

from moge.distributed.agree import agree
from moge.distributed.mesh import World, single_process
from moge.distributed.parallelize import checkpoint_views
from moge.distributed.parallelize import local as _local
from moge.training.config import RunConfig, config_from_dict, config_to_dict
from moge.training.durable import fsync_path, write_atomic
from moge.training.manifest import STATE, read_state, write_manifest
from moge.training.manifest import verify_checkpoint as verify_manifest

if TYPE_CHECKING:
    from moge.model import MoGETransformer

CHECKPOINTS = "checkpoints"
LATEST = "LATEST"
RNG_FILE = "rng.safetensors"
SHARD_SUFFIX = ".safetensors"
FILES = (RNG_FILE,)  # files every checkpoint lists besides its shards (shard-*.safetensors)
_STEP_DIR = re.compile(r"^step_(\d{8,})$")
_TMP_PREFIX = ".tmp-"
_MAX_LISTED = 8  # keys named in one error message


def step_dirname(step: int) -> str:
    return f"step_{step:08d}"


# ---------------------------------------------------------------- durable writes


def _unique(root: Path, stem: str) -> Path:
    """A fresh temporary name under root (mkdtemp/mkstemp would force 0700/0600 modes)."""
    return root / f"{_TMP_PREFIX}{stem}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def _write_text_atomic(path: Path, text: str) -> None:
    write_atomic(path, text.encode("utf-8"))


# ---------------------------------------------------------------- the tensors of a checkpoint


def init_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Give every parameter AdamW's state as its first step would (zeros), so a
    checkpoint can be loaded into it in place; parameters that have state keep it."""
    amsgrad = any(g.get("amsgrad") for g in optimizer.param_groups)
    # Fused and capturable AdamW keep `step` on the parameter's device (a CUDA kernel
    # reads it); the plain one keeps it on the CPU. As torch's own first step does.
    on_device = {
        id(p) for g in optimizer.param_groups if g.get("fused") or g.get("capturable") for p in g["params"]
    }
    for p in model.parameters():
        if p.requires_grad and p not in optimizer.state:
            step_device = p.device if id(p) in on_device else None
            state = {"step": torch.zeros((), dtype=torch.float32, device=step_device)}
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            if amsgrad:
                state["max_exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            optimizer.state[p] = state


def checkpoint_state(
    model: nn.Module, optimizer: torch.optim.Optimizer | None, world: World
) -> dict[str, Tensor]:
    """Flat name -> tensor dict DCP writes or loads into, sharing storage with the model
    and the optimizer: "model.<state_dict key>", "optim.<param name>.<state key>".

    Sharded tensors are DTensors of the whole model's shape (expert-parallel ones as a
    view over the ("dp", "ep") mesh), so every rank writes its own piece.
    """
    views = checkpoint_views(model, world) if world.size > 1 else {}
    out = {f"model.{k}": views[k](v) if k in views else v for k, v in model.state_dict().items()}
    if optimizer is None:
        return out
    for name, p in model.named_parameters():
        for key, v in optimizer.state.get(p, {}).items():
            if not isinstance(v, Tensor):
                raise ValueError(f"optimizer: state {name}.{key} is not a tensor ({type(v).__name__})")
            moment = v.dim() > 0 and v.shape == p.shape
            out[f"optim.{name}.{key}"] = views[name](v) if moment and name in views else v
    return out


def _group_names(model: nn.Module, optimizer: torch.optim.Optimizer) -> list[list[str]]:
    """Parameter names of every param group, in the optimizer's order."""
    names = {id(p): n for n, p in model.named_parameters()}
    out = []
    for i, group in enumerate(optimizer.param_groups):
        if any(id(p) not in names for p in group["params"]):
            raise ValueError(f"optimizer: param group {i} holds parameters that are not in the model")
        out.append([names[id(p)] for p in group["params"]])
    return out


def _param_groups(model: nn.Module, optimizer: torch.optim.Optimizer) -> list[dict]:
    """The groups' settings (JSON) with their parameters by name."""
    return [
        {**{k: v for k, v in g.items() if k != "params"}, "params": names}
        for g, names in zip(optimizer.param_groups, _group_names(model, optimizer))
    ]


def _restore_groups(model: nn.Module, optimizer: torch.optim.Optimizer, saved: Any, file: Path) -> None:
    _check_groups(file, saved, {})
    current = _group_names(model, optimizer)
    if not isinstance(saved, list) or [g.get("params") for g in saved if isinstance(g, dict)] != current:
        raise ValueError(f"{file}: the saved optimizer param groups do not match this model's parameters")
    for group, s in zip(optimizer.param_groups, saved):
        group.update({k: tuple(v) if k == "betas" else v for k, v in s.items() if k != "params"})


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
    fsync_path(path)


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
    # Left behind only by a crash mid-save; never referenced by LATEST. Best effort, as
    # _prune: once LATEST names the new step the save has happened, and a temp file that
    # cannot go (a permission, a busy file system) must not report it failed.
    for path in root.glob(_TMP_PREFIX + "*"):
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):
                path.unlink(missing_ok=True)


def _os_reason(err: OSError) -> str:
    return err.strerror or str(err)[:300]


def _kept(root: Path) -> str:
    try:
        return f"{root / LATEST} still names {_read_latest(root / LATEST)}, which is kept"
    except (OSError, ValueError):
        return "no earlier checkpoint exists"


def _temp_folder(root: Path, name: str, world: World) -> Path:
    """The same fresh temporary folder name on every rank (rank 0 draws it)."""
    token = torch.tensor([int.from_bytes(os.urandom(7), "little")], dtype=torch.int64, device=world.device)
    world.broadcast(token)
    return root / f"{_TMP_PREFIX}{name}-{int(token.item()):014x}"


def _rng_tensors(data_gen: torch.Generator, world: World) -> dict[str, Tensor]:
    """This rank's (rank 0's) torch RNG, the data generator and, with several ranks,
    every rank's torch RNG (a collective)."""
    rng = {"torch_cpu": torch.get_rng_state(), "data_gen": data_gen.get_state()}
    if world.size > 1:
        parts = world.all_gather(torch.get_rng_state().to(world.device))
        rng.update({f"torch_cpu_rank{r}": t.cpu() for r, t in enumerate(parts)})
    return rng


def _write_state(
    folder: Path, step: int, cfg: RunConfig, world: World, groups: list[dict], rng: dict
) -> None:
    for path in sorted(
        folder.iterdir()
    ):  # the shards were written by other ranks: make them durable here too
        fsync_path(path)
    state = {
        "step": step,
        "config": config_to_dict(cfg),
        "world": {"size": world.size, "dp": world.shape.dp, "ep": world.shape.ep},
        "optimizer": {"param_groups": groups},
        "rng": {"file": RNG_FILE, "tensors": sorted(rng)},
    }
    write_manifest(folder, state)  # lists every file (each shard) with its size and sha256
    fsync_path(folder)


def _publish(root: Path, tmp: Path, final: Path, keep_last: int) -> None:
    if final.exists():  # the same step saved again: os.replace cannot overwrite a folder
        os.replace(final, _unique(root, "old"))
    os.replace(tmp, final)
    fsync_path(root)
    _write_text_atomic(root / LATEST, final.name + "\n")
    _remove_stale_temps(root)
    _prune(root, keep_last, final.name)


def _write_shards(state: dict[str, Tensor], tmp: Path, world: World) -> None:
    """Every rank writes its own shards (DCP; a collective)."""
    writer = HuggingFaceStorageWriter(str(tmp), save_distributed=True)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="torch.distributed is disabled", category=UserWarning)
            dcp.save(state, storage_writer=writer, no_dist=world.size == 1)
    except CheckpointException as err:  # DCP gathers every rank's failure; a disk error stays an OSError
        # failures maps rank -> (exception, traceback summary)
        errors = [e for e, _ in err.failures.values() if isinstance(e, OSError)]
        reason = _os_reason(errors[0]) if errors else str(err)[:300]
        raise OSError(f"{tmp}: writing the shards failed ({reason})") from err


def save_checkpoint(
    run_dir: str | Path,
    step: int,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    data_gen: torch.Generator,
    cfg: RunConfig,
    keep_last: int,
    world: World | None = None,
) -> Path:
    """Write checkpoints/step_<step>/ atomically, point LATEST at it, keep the newest keep_last.

    world: the run's World (a collective on all its ranks); None: one process. Returns
    the checkpoint folder. On any error the temporary folder is removed and the
    previous checkpoints and LATEST are untouched.
    """
    world = world or single_process()
    if keep_last < 1:
        raise ValueError(f"train.keep_last: must be >= 1, got {keep_last}")
    root = Path(run_dir) / CHECKPOINTS
    final = root / step_dirname(step)
    tmp = _temp_folder(root, final.name, world)

    def prepare() -> None:
        if world.main:
            root.mkdir(parents=True, exist_ok=True)
            _remove_stale_temps(root)
            tmp.mkdir()

    agree(world, f"step {step}: preparing the checkpoint folder", prepare)
    # A fresh optimizer (step 0: an upcycled or extracted run) has no state yet; AdamW's
    # zeros are what its first step would create, and what loading it back expects.
    init_optimizer_state(model, optimizer)
    try:
        _write_shards(checkpoint_state(model, optimizer, world), tmp, world)
        rng = _rng_tensors(data_gen, world)
        groups = _param_groups(model, optimizer)

        def finish() -> None:
            if world.main:
                _save_tensors(rng, tmp / RNG_FILE)
                _write_state(tmp, step, cfg, world, groups, rng)
                _publish(root, tmp, final, keep_last)

        agree(world, f"step {step}: saving the checkpoint", finish)
    except OSError as err:  # a full disk, a quota: one line saying what is kept
        if world.main:
            shutil.rmtree(tmp, ignore_errors=True)
        raise OSError(f"saving the checkpoint of step {step} in {root} failed ({_os_reason(err)}); "
                      f"{_kept(root)}") from err  # fmt: skip
    except BaseException:
        if world.main:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
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


def _is_int(value: Any) -> bool:
    return type(value) is int  # not bool, not float


def _check_layout_keys(file: Path, state: dict) -> None:
    """The keys a sharded checkpoint adds to state.json: the world and the AdamW groups."""
    world = state.get("world")
    if world is not None and not (
        isinstance(world, dict)
        and set(world) == {"size", "dp", "ep"}
        and all(_is_int(v) and 1 <= v < 2**31 for v in world.values())
        and world["dp"] * world["ep"] == world["size"]
    ):
        raise ValueError(f"{file}: 'world' must be {{'size', 'dp', 'ep'}} integers >= 1 with dp * ep = size")
    opt = state.get("optimizer")
    if opt is not None and not (isinstance(opt, dict) and set(opt) == {"param_groups"}):
        raise ValueError(f"{file}: 'optimizer' must be {{'param_groups': [groups]}}")


def verify_checkpoint(folder: str | Path, required: tuple[str, ...] = FILES) -> dict:
    """moge.training.manifest.verify_checkpoint (digest, schema, every file listed and verified,
    nothing unlisted) plus what a sharded checkpoint needs: at least one shard listed,
    and a well-formed world and AdamW groups. Returns state.json."""
    folder = Path(folder)
    state = verify_manifest(folder, required)
    if not any(n.endswith(SHARD_SUFFIX) and n != RNG_FILE for n in state["files"]):
        raise ValueError(f"{folder / STATE}: lists no shard file (shard-*.safetensors)")
    _check_layout_keys(folder / STATE, state)
    return state


def _shard_files(state: dict) -> list[str]:
    """The shard files state.json lists (verify_checkpoint has checked them)."""
    return sorted(n for n in state["files"] if n.endswith(SHARD_SUFFIX) and n != RNG_FILE)


def _saved_layout(folder: Path) -> dict:
    """Name -> TensorStorageMetadata (global shape, dtype) from the shards' headers."""
    for file in sorted(folder.glob("*" + SHARD_SUFFIX)):  # name the file a decoding problem is in (rng too)
        try:
            with safe_open(str(file), framework="pt") as f:
                f.metadata()
        except (SafetensorError, OSError, RuntimeError, ValueError) as err:
            raise ValueError(f"{file}: not a readable safetensors file ({err})") from err
    try:
        return HuggingFaceStorageReader(str(folder)).read_metadata().state_dict_metadata
    except (SafetensorError, OSError, RuntimeError, ValueError, KeyError, json.JSONDecodeError) as err:
        raise ValueError(f"{folder}: a shard file is not a readable safetensors file ({err})") from err


def _check_layout(folder: Path, saved: dict, target: dict[str, Tensor], prefix: str) -> None:
    """Missing, unexpected, reshaped and retyped tensors, named (ValueError)."""
    want = {k for k in target if k.startswith(prefix)}
    have = {k for k in saved if k.startswith(prefix)}
    cut = len(prefix)
    missing, extra = sorted(k[cut:] for k in want - have), sorted(k[cut:] for k in have - want)
    if missing or extra:
        parts = ([f"missing keys: {_list(missing)}"] if missing else []) + (
            [f"unexpected keys: {_list(extra)}"] if extra else []
        )
        raise ValueError(f"{folder}: does not match the {prefix[:-1]}; " + "; ".join(parts))
    wrong = [
        f"{k[cut:]} saved {shape} vs model {tuple(target[k].shape)}"
        for k in target
        if k in want
        for shape in {
            tuple(saved[k].size),
            *(tuple(c.sizes) for c in saved[k].chunks if len(c.sizes) != target[k].dim()),
        }
        if shape != tuple(target[k].shape)
    ]
    if wrong:
        raise ValueError(f"{folder}: another architecture (shape mismatch): {_list(wrong)}")
    retyped = [
        f"{k[cut:]} saved {saved[k].properties.dtype} vs model {target[k].dtype}"
        for k in target
        if k in want and saved[k].properties.dtype != target[k].dtype
    ]
    if retyped:
        raise ValueError(f"{folder}: dtype mismatch (never cast silently): {_list(retyped)}")


def _read_rng(folder: Path, world: World) -> dict[str, Tensor]:
    rng_file = folder / RNG_FILE
    try:
        rng = load_file(str(rng_file))
    except (SafetensorError, OSError, RuntimeError, ValueError) as err:
        raise ValueError(f"{rng_file}: not a readable safetensors file ({err})") from err
    _check_rng(rng_file, rng, f"torch_cpu_rank{world.rank}")
    return rng


def _set_rng(folder: Path, rng: dict[str, Tensor], data_gen: torch.Generator, world: World) -> None:
    try:
        torch.set_rng_state(rng.get(f"torch_cpu_rank{world.rank}", rng["torch_cpu"]))
        data_gen.set_state(rng["data_gen"])
    except RuntimeError as err:
        raise ValueError(f"{folder / RNG_FILE}: not a valid RNG state ({str(err)[:200]})") from err


@torch.no_grad()
def _check_loaded_optimizer(folder: Path, target: dict[str, Tensor]) -> None:
    """Value ranges of this rank's AdamW state as loaded (no collective): moments finite,
    second moments >= 0, step counts finite and >= 0."""
    for key, t in target.items():
        if not key.startswith("optim."):
            continue
        kind, t = key.rpartition(".")[2], _local(t)
        if kind == "step":
            if t.numel() != 1 or not bool(torch.isfinite(t).all()) or float(t) < 0:
                raise ValueError(f"{folder}: {key[6:]} must be one finite number >= 0, got {float(t)}")
        elif not bool(torch.isfinite(t).all()) or (kind != "exp_avg" and bool((t < 0).any())):
            raise ValueError(f"{folder}: {key[6:]} holds NaN/Inf or a negative second moment")


def load_checkpoint(
    path_or_run_dir: str | Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    data_gen: torch.Generator | None = None,
    world: World | None = None,
) -> int:
    """Load model (and optimizer, torch RNG + data generator if given); return the step.

    Accepts a checkpoint folder, a run dir, or a run's checkpoints/ folder (then LATEST).
    The model (and optimizer) may be parallelized on any world: DCP reads each rank's
    slice of every tensor whatever world wrote it. world None: one process. Every file
    is verified first; a mismatch raises ValueError naming the folder and the keys.
    """
    world = world or single_process()

    def prepare() -> tuple[
        Path, dict, dict[str, Tensor], dict | None, torch.optim.Optimizer | None
    ]:  # no collectives: may fail on one rank
        folder = find_checkpoint(path_or_run_dir)
        state = verify_checkpoint(folder)  # every file, before anything is read or changed
        saved = _saved_layout(folder)
        rng = _read_rng(folder, world) if data_gen is not None else None
        optim = optimizer
        if "optimizer" not in state and state["step"] == 0:
            # Weights only (moge convert --to moge, save_pretrained(layout="moge")): before
            # any update, so the optimizer starts fresh, as in a new run.
            optim = None
        if optim is not None:
            _check_groups(folder / STATE, state.get("optimizer", {}).get("param_groups"), {})
            init_optimizer_state(model, optim)
        target = checkpoint_state(model, optim, world)
        for prefix in ("model.", "optim.") if optim is not None else ("model.",):
            _check_layout(folder, saved, target, prefix)
        return folder, state, target, rng, optim

    folder, state, target, rng, optimizer = agree(world, "reading the checkpoint", prepare)
    try:  # DCP agrees on a failure of any rank itself
        with warnings.catch_warnings():  # one process: no process group, as asked
            warnings.filterwarnings("ignore", message="torch.distributed is disabled", category=UserWarning)
            dcp.load(target, storage_reader=HuggingFaceStorageReader(str(folder)), no_dist=world.size == 1)
    except CheckpointException as err:
        raise ValueError(f"{folder}: reading the shards failed: {err}") from err
    if optimizer is not None:
        agree(world, "checking the optimizer state", lambda: _check_loaded_optimizer(folder, target))
        _restore_groups(model, optimizer, state.get("optimizer", {}).get("param_groups"), folder / STATE)
    if data_gen is not None:
        assert rng is not None, "prepare reads the RNG file whenever data_gen is given"
        agree(world, "restoring the RNG state", lambda: _set_rng(folder, rng, data_gen, world))
    return state["step"]


def _check_rng(file: Path, rng: dict, rng_key: str) -> None:
    missing = [k for k in ("torch_cpu", "data_gen") if k not in rng]
    if missing:
        raise ValueError(f"{file}: missing keys: {_list(missing)}")
    # The size too: checked here, inside the ranks' agreement on reading, setting a state
    # of another size would fail later on one rank alone and leave the others waiting.
    size = torch.Generator().get_state().numel()  # a CPU generator's state, as torch_cpu's
    for key in ("data_gen", rng_key if rng_key in rng else "torch_cpu"):
        t = rng[key]
        if t.dtype != torch.uint8 or t.dim() != 1:
            raise ValueError(
                f"{file}: RNG state {key!r} must be a 1-D uint8 tensor, got {t.dtype} {tuple(t.shape)}"
            )
        if t.numel() != size:
            raise ValueError(
                f"{file}: not a valid RNG state: {key!r} holds {t.numel()} bytes, a CPU generator's state {size}"
            )


def checkpoint_config(path_or_run_dir: str | Path) -> RunConfig:
    """The resolved config stored in the newest (or the given) checkpoint."""
    folder = find_checkpoint(path_or_run_dir)
    return config_from_dict(read_state(folder)["config"], source=str(folder / STATE))


def load_run(
    run_dir: str | Path, map_location: str | torch.device = "cpu"
) -> tuple[MoGETransformer, RunConfig, int]:
    """(model in eval mode, its config, step) of a run's newest checkpoint, in one
    process whatever world size wrote it.

    Built on the meta device and allocated uninitialised on map_location: the checkpoint
    writes every parameter and persistent buffer (load_checkpoint checks that its keys
    are the model's), so an init would be wasted work; the other buffers come from the
    config (init_buffers)."""
    from moge.model import MoGETransformer  # model imports config only; keep this module light
    from moge.model.init import init_buffers
    from moge.training.limits import check_model_fits

    cfg = checkpoint_config(run_dir)
    device = torch.device(map_location)
    check_model_fits(cfg, f"{find_checkpoint(run_dir) / STATE}", str(device.type))
    with torch.device("meta"):
        model = MoGETransformer(cfg.model, cfg.moe)
    model.to_empty(device=device)
    init_buffers(model, device)
    step = load_checkpoint(run_dir, model)
    return model.eval(), cfg, step


def read_tensors(path_or_run_dir: str | Path) -> dict[str, Tensor]:
    """Every tensor of a checkpoint, whole, in one process: "model.<name>",
    "optim.<name>.<key>" (from the shards) and "rng.<key>"; files verified first."""
    folder = find_checkpoint(path_or_run_dir)
    verify_checkpoint(folder)
    layout = _saved_layout(folder)
    out = {
        k: torch.empty(tuple(m.size), dtype=m.properties.dtype)
        for k, m in layout.items()
        if k.startswith(("model.", "optim."))
    }
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled", category=UserWarning)
        dcp.load(out, storage_reader=HuggingFaceStorageReader(str(folder)), no_dist=True)
    rng = load_file(str(folder / RNG_FILE))
    return {**out, **{f"rng.{k}": v for k, v in rng.items()}}


# ---------------------------------------------------------------- where to resume


def resume_point(out_dir: Path) -> tuple[Path | None, str | None]:
    """(checkpoint folder or None, a note for the log or None) of a run folder.

    LATEST present: the folder it names (damage there is an error, never a fresh start).
    LATEST missing: the newest step folder if it verifies completely (the note says so);
    otherwise ValueError naming it (no folder is overwritten).
    """
    root = out_dir / CHECKPOINTS
    if (root / LATEST).exists():
        return find_checkpoint(out_dir), None
    folders = step_folders(root)
    if not folders:
        return None, None
    newest = folders[-1]
    try:
        verify_checkpoint(newest, FILES)
    except (ValueError, OSError) as err:
        # Resuming from an older folder would later save over this one: refuse instead.
        raise ValueError(
            f"train.resume: {root / LATEST} is missing and the newest step folder {newest} does not "
            f"verify ({err}); nothing was changed: restore LATEST, or move the damaged folder away "
            "to resume from an older one"
        ) from err
    return newest, f"{root / LATEST} is missing; resuming from the newest verified checkpoint {newest}"
