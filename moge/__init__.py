"""moge: Mixture of Grouped Experts (Pangu Pro MoE, arXiv 2505.21411) in pure PyTorch."""

from moge import balance, routing, testing
from moge.layer import MoGEConfig, MoGELayer, MoGEOutput

__all__ = ["MoGEConfig", "MoGELayer", "MoGEOutput", "balance", "from_pretrained", "routing", "testing"]


def from_pretrained(path, **kwargs):
    """(MoGETransformer, RunConfig) from a layout folder (config.json) or a moge run/checkpoint.

    See moge.interop.from_pretrained (kwargs: dtype, max_seq_len); imported on first use,
    as it pulls in the whole model.
    """
    from moge.interop import from_pretrained as load

    return load(path, **kwargs)


__version__ = "0.1.0"
