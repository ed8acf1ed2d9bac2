"""moge: Mixture of Grouped Experts (Pangu Pro MoE, arXiv 2505.21411) in pure PyTorch."""

from moge import balance, routing, testing
from moge.dropin import MoGEMLP, aux_loss, counting_pass, end_step, moge_layers, routing_stats
from moge.layer import CountingPassWarning, EndStepWarning, MoGEConfig, MoGELayer, MoGEOutput

__all__ = [
    "CountingPassWarning",
    "EndStepWarning",
    "MoGEConfig",
    "MoGELayer",
    "MoGEMLP",
    "MoGEOutput",
    "aux_loss",
    "balance",
    "counting_pass",
    "end_step",
    "from_pretrained",
    "moge_layers",
    "routing",
    "routing_stats",
    "testing",
]


def from_pretrained(path, **kwargs):
    """(MoGETransformer, RunConfig) from a layout folder (config.json) or a moge run/checkpoint.

    See moge.interop.from_pretrained (kwargs: dtype, max_seq_len); imported on first use,
    as it pulls in the whole model.
    """
    from moge.interop import from_pretrained as load

    return load(path, **kwargs)


__version__ = "0.1.0"
