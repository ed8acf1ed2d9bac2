"""moge: Mixture of Grouped Experts (Pangu Pro MoE, arXiv 2505.21411) in pure PyTorch."""

from moge import balance, routing, testing
from moge.dropin import MoGEMLP, aux_loss, end_step, moge_layers, routing_stats
from moge.layer import EndStepWarning, MoGEConfig, MoGELayer, MoGEOutput

__all__ = [
    "EndStepWarning",
    "MoGEConfig",
    "MoGELayer",
    "MoGEMLP",
    "MoGEOutput",
    "aux_loss",
    "balance",
    "end_step",
    "moge_layers",
    "routing",
    "routing_stats",
    "testing",
]
__version__ = "0.1.0"
