"""`moge train`: one loop for one process or many (moge.distributed shards the model).

optim.py    AdamW groups and the LR schedule
metrics.py  validation loss, routing statistics of the whole step, metrics.jsonl
checks.py   NaN/Inf guards; every rank stops together
loop.py     train(): set up, step, log, evaluate, checkpoint, resume
"""

from moge.training.checks import NonFiniteLossError
from moge.training.loop import TrainResult, train
from moge.training.optim import build_optimizer, lr_at

__all__ = ["NonFiniteLossError", "TrainResult", "build_optimizer", "lr_at", "train"]
