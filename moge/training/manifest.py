"""A checkpoint folder's manifest: state.json lists every file, state.json.sha256 vouches for it.

    <folder>/state.json          {"step", "config", "files": {name: {"bytes", "sha256"}}, "rng"?}
    <folder>/state.json.sha256   the sha256 of state.json itself

`write_manifest` lists every other file of a folder (whatever layout wrote them: three
safetensors files, or the shards of a sharded checkpoint) and `verify_checkpoint` checks
all of it before anything is loaded: the digest of state.json (a flipped bit anywhere in
it, a config value or the step, cannot hide), its schema and value ranges (strict JSON:
no duplicate keys, no NaN), that every listed file is there with its size and sha256
(mandatory), and that no unlisted file is. Every problem is one ValueError (or
FileNotFoundError) naming the file.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path
from typing import Any

STATE = "state.json"
STATE_DIGEST = "state.json.sha256"
# What state.json may hold ("rng" optional; "world", "optimizer": a sharded checkpoint, moge.training.checkpoint).
STATE_KEYS = ("step", "config", "files", "rng", "world", "optimizer")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_DIGEST_FILE = re.compile(rb"[0-9a-f]{64}\n?")
_STEP_DIR = re.compile(r"^step_(\d{8,})$")
_MAX_STEP = 2**53  # exact in a JSON number read by any reader
_MAX_STATE_BYTES = 16 << 20  # a state.json larger than this is not one moge wrote
_MAX_LISTED = 8  # names in one error message


def _list(names: list[str]) -> str:
    shown = ", ".join(names[:_MAX_LISTED])
    return shown + (f" ... ({len(names)} in all)" if len(names) > _MAX_LISTED else "")


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def write_manifest(folder: Path, state: dict) -> None:
    """Write state.json (with "files": size + sha256 of every other file in `folder`) and its digest.

    Every regular file already in `folder` is listed, so a layout with more files (shards)
    is covered by the same verification. Both files are fsynced.
    """
    names = sorted(p.name for p in folder.iterdir() if p.name not in (STATE, STATE_DIGEST))
    files = {
        name: {"bytes": (folder / name).stat().st_size, "sha256": sha256_file(folder / name)}
        for name in names
    }
    data = json.dumps({**state, "files": files}, indent=1).encode("utf-8")
    for name, content in ((STATE, data), (STATE_DIGEST, (hashlib.sha256(data).hexdigest() + "\n").encode())):
        with open(folder / name, "wb") as f:
            f.write(content)
            f.flush()
            os.fsync(f.fileno())


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict:
    keys = [k for k, _ in pairs]
    dup = next((k for k in keys if keys.count(k) > 1), None)
    if dup is not None:
        raise ValueError(f"the key {dup!r} appears twice")
    return dict(pairs)


def _no_constant(name: str) -> None:
    raise ValueError(f"{name} is not a JSON number")


def _is_int(value: Any) -> bool:
    return type(value) is int  # not bool, not float


def _check_files_entry(file: Path, files: Any) -> None:
    if not isinstance(files, dict) or not files:
        raise ValueError(f"{file}: 'files' must be a non-empty mapping of file name to size and sha256")
    for name, entry in files.items():
        if not name or "/" in name or "\\" in name or name in (".", "..", STATE, STATE_DIGEST):
            raise ValueError(f"{file}: 'files' lists an invalid file name {name[:80]!r}")
        if not isinstance(entry, dict) or set(entry) != {"bytes", "sha256"}:
            raise ValueError(f"{file}: 'files'.{name[:80]} must hold exactly 'bytes' and 'sha256'")
        size, digest = entry["bytes"], entry["sha256"]
        if not _is_int(size) or not 0 <= size < 2**63:
            raise ValueError(f"{file}: 'files'.{name}.bytes must be an integer >= 0, got {str(size)[:40]}")
        if not isinstance(digest, str) or not _SHA256.match(digest):
            raise ValueError(f"{file}: 'files'.{name}.sha256 must be 64 lowercase hex digits")


def _check_state(file: Path, folder: Path, state: Any) -> dict:
    """Schema and value ranges of a parsed state.json; ValueError naming the file and key."""
    if not isinstance(state, dict):
        raise ValueError(f"{file}: expected a JSON object, got {type(state).__name__}")
    for key in ("step", "config", "files"):
        if key not in state:
            raise ValueError(f"{file}: the key {key!r} is missing")
    unknown = sorted(k for k in state if k not in STATE_KEYS)
    if unknown:
        raise ValueError(
            f"{file}: unknown keys {_list([k[:40] for k in unknown])}; valid: {', '.join(STATE_KEYS)}"
        )
    step = state["step"]
    if not _is_int(step) or not 0 <= step <= _MAX_STEP:
        raise ValueError(
            f"{file}: 'step' must be an integer in 0..2**53, got {str(step)[:40]} ({type(step).__name__})"
        )
    m = _STEP_DIR.match(folder.name)
    if m and int(m.group(1)) != step:
        raise ValueError(f"{file}: 'step' is {step} but the folder is {folder.name}")
    if not isinstance(state["config"], dict):
        raise ValueError(f"{file}: 'config' must be a mapping, got {type(state['config']).__name__}")
    steps = (
        state["config"].get("train", {}).get("steps")
        if isinstance(state["config"].get("train"), dict)
        else None
    )
    if _is_int(steps) and step > steps:
        raise ValueError(f"{file}: 'step' {step} is beyond the run's train.steps={steps}")
    _check_files_entry(file, state["files"])
    rng = state.get("rng")
    if rng is not None and not (
        isinstance(rng, dict)
        and isinstance(rng.get("file"), str)
        and isinstance(rng.get("tensors"), list)
        and all(isinstance(t, str) for t in rng["tensors"])
    ):
        raise ValueError(f"{file}: 'rng' must be {{'file': name, 'tensors': [names]}}")
    return state


def read_state(folder: Path) -> dict:
    """state.json checked against state.json.sha256, parsed strictly, its schema checked."""
    file, digest_file = folder / STATE, folder / STATE_DIGEST
    if not digest_file.is_file():
        raise ValueError(
            f"{digest_file}: missing (every checkpoint has one; this folder is damaged or was "
            "written by an older moge)"
        )
    with open(digest_file, "rb") as f:
        raw = f.read(128)
    if not _DIGEST_FILE.fullmatch(raw):  # exactly the digest and a newline: any flip shows
        raise ValueError(f"{digest_file}: not a sha256 hex digest (64 lowercase hex digits and a newline)")
    expected = raw[:64].decode("ascii")
    if not file.is_file() or file.stat().st_size > _MAX_STATE_BYTES:
        raise ValueError(f"{file}: missing, not a regular file, or larger than {_MAX_STATE_BYTES} bytes")
    data = file.read_bytes()
    if hashlib.sha256(data).hexdigest() != expected:
        raise ValueError(f"{file}: corrupted: its sha256 differs from the one in {STATE_DIGEST}")
    try:
        state = json.loads(
            data.decode("utf-8"), object_pairs_hook=_no_duplicates, parse_constant=_no_constant
        )
    except (UnicodeDecodeError, ValueError, RecursionError) as err:
        raise ValueError(f"{file}: not a readable JSON checkpoint state ({str(err)[:200]})") from err
    return _check_state(file, folder, state)


def verify_file(folder: Path, name: str, state: dict) -> Path:
    """The file `name`, checked against its size and sha256 in state.json (both mandatory)."""
    file = folder / name
    expected = state["files"].get(name)
    if expected is None:
        raise ValueError(f"{file}: not listed in {folder / STATE}, so it cannot be verified")
    if not file.exists():
        raise FileNotFoundError(f"{file}: missing from the checkpoint")
    if not file.is_file():
        raise ValueError(f"{file}: not a regular file")
    size = file.stat().st_size
    if size != expected["bytes"]:
        raise ValueError(f"{file}: truncated or corrupted: {size} bytes, state.json says {expected['bytes']}")
    if sha256_file(file) != expected["sha256"]:
        raise ValueError(f"{file}: corrupted: its sha256 differs from the one in state.json")
    return file


def verify_checkpoint(folder: str | Path, required: tuple[str, ...] = ()) -> dict:
    """Verify a whole checkpoint folder and return its state.json.

    Checks state.json against its digest, its schema and ranges, that every `required`
    file is listed, every listed file is present with its size and sha256, and that the
    folder holds no file state.json does not list. Any problem: ValueError or
    FileNotFoundError naming the file.
    """
    folder = Path(folder)
    state = read_state(folder)
    for name in required:
        if name not in state["files"]:
            raise ValueError(f"{folder / name}: not listed in {folder / STATE}, so it cannot be verified")
    for name in sorted(state["files"]):
        verify_file(folder, name, state)
    unlisted = sorted(
        p.name
        for p in folder.iterdir()
        if p.name not in state["files"] and p.name not in (STATE, STATE_DIGEST)
    )
    if unlisted:
        raise ValueError(
            f"{folder}: holds files state.json does not list: {_list([n[:80] for n in unlisted])}"
        )
    return state
