"""The old import path of the trainer; it lives in moge.training now."""

from moge.training import NonFiniteLossError, TrainResult, build_optimizer, lr_at, train

__all__ = ["NonFiniteLossError", "TrainResult", "build_optimizer", "lr_at", "train"]
