"""`moge train`: one loop for one process or many (moge.distributed shards the model).

config.py      RunConfig: one dataclass per section, YAML loading, overrides
safeyaml.py    bounded, duplicate-free YAML parsing
data.py        the byte-level corpus and the batch sampler
limits.py      sizes refused before anything is allocated
manifest.py    checkpoint manifests: every file with its sha256
runfolder.py   run lock, resume point, atomic metrics, SIGTERM
checkpoint.py  sharded DCP checkpoints (safetensors, no pickle)
optim.py       AdamW groups and the LR schedule
metrics.py     validation loss, routing statistics of the whole step, metrics.jsonl
checks.py      NaN/Inf guards; every rank stops together
loop.py        train(): set up, step, log, evaluate, checkpoint, resume
"""

from __future__ import annotations

import importlib
from typing import Any

# The loop pulls in the model, the mesh and DCP; `moge.training.config` alone must stay light
# (interop and the CLI read configs), so the loop's names load on first use (PEP 562).
_LAZY = {
    "NonFiniteLossError": "moge.training.checks",
    "TrainResult": "moge.training.loop",
    "train": "moge.training.loop",
    "build_optimizer": "moge.training.optim",
    "lr_at": "moge.training.optim",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'moge.training' has no attribute {name!r}")
    return getattr(importlib.import_module(_LAZY[name]), name)
