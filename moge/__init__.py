"""moge: Mixture of Grouped Experts (Pangu Pro MoE, arXiv 2505.21411) in pure PyTorch."""

from moge import balance, routing, testing
from moge.layer import MoGEConfig, MoGELayer, MoGEOutput

__all__ = ["MoGEConfig", "MoGELayer", "MoGEOutput", "balance", "routing", "testing"]
__version__ = "0.1.0"
