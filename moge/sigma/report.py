"""Validation loss per domain: a full two-level-RRE model, its sub-models, a baseline.

`domain_val_losses(model, dataset, ...)` measures the mean token NLL of each domain's
fixed validation windows (moge.sigma.data: the same windows whether the other domains
are loaded or not), in float32, eval mode. scripts/sigma_report.py prints the README's
table with it.
"""

from __future__ import annotations

import torch

from moge.sigma.data import DomainTokenDataset


@torch.no_grad()
def domain_val_loss(model, dataset: DomainTokenDataset, domain: str, batch_size: int, batches: int) -> float:
    """Token-weighted mean NLL of `domain`'s val windows (model in eval mode, float32)."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    nll, tokens = 0.0, 0
    try:
        for batch in dataset.iter_eval_batches("val", batch_size, batches, domain=domain):
            x_BL, y_BL = batch
            out = model(x_BL.to(device), y_BL.to(device), **_domain_kwargs(model, batch, device))
            nll += float(out.lm_loss) * y_BL.numel()
            tokens += y_BL.numel()
    finally:
        model.train(was_training)
    return nll / tokens


def _domain_kwargs(model, batch, device) -> dict:
    # A sub-model has one domain, id 0; the batch carries the id in the dataset it came from.
    if len(model.moe_cfg.rre_domain_groups or {}) == 1:
        return {}
    return batch.model_kwargs(device)


def domain_val_losses(model, dataset: DomainTokenDataset, batch_size: int, batches: int) -> dict[str, float]:
    """{domain: val loss} for every domain of `dataset`."""
    return {name: domain_val_loss(model, dataset, name, batch_size, batches) for name in dataset.domains}
