"""Durable small writes: a crash leaves either the old or the new content, never a torn file."""

from __future__ import annotations

import os
import uuid
from pathlib import Path


def fsync_path(path: Path) -> None:
    """fsync a file or (where the OS allows opening one) a folder."""
    is_dir = path.is_dir()
    flags = os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) if is_dir else os.O_RDONLY
    try:
        fd = os.open(path, flags)
    except OSError:
        if is_dir:  # e.g. Windows cannot open folders; the rename is still atomic
            return
        raise
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, data: bytes) -> None:
    """Replace `path` by `data`: written to a temporary sibling, fsynced, renamed, folder fsynced.

    An OSError (e.g. a full disk) names the file and says that its old content is kept.
    """
    # A unique name per call: two threads or processes never share a temporary file.
    tmp = path.parent / f".tmp-{path.name}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        with open(tmp, "xb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        raise OSError(
            f"{path}: writing failed ({err.strerror or err}); its previous content is kept"
        ) from err
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_path(path.parent)
