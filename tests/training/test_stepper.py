"""The training loop's step outside `train()` (train_stepper) and the skipped no-op clip."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from test_train import make_cfg, records

from moge.distributed.mesh import single_process
from moge.model import MoGETransformer
from moge.training import loop, train

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def test_train_stepper_takes_the_steps_train_takes(tmp_path):
    cfg = make_cfg(tmp_path / "run", steps=4)
    train(cfg, progress=False)
    logged = records(tmp_path / "run", "train")
    model, dataset, step = loop.train_stepper(cfg)
    ours = [step(i) for i in range(4)]
    assert [r["loss"] for r in ours] == [r["loss"] for r in logged]
    assert [r["grad_norm"] for r in ours] == [r["grad_norm"] for r in logged]
    assert ours[-1]["routing"] == logged[-1]["routing"]
    assert model.training and dataset.source


@pytest.mark.parametrize("factor, clips", [(0.9, True), (1.0, True), (1.1, False)])
def test_clip_runs_only_when_it_scales_and_equals_torchs(tmp_path, monkeypatch, factor, clips):
    """grad_clip = factor * the gradient's norm; at 1.0 torch still scales by norm / (norm + 1e-6)."""
    calls = []
    real = loop.clip_grads_

    def spy(model, max_norm, norm):
        calls.append(float(norm))
        real(model, max_norm, norm)

    monkeypatch.setattr(loop, "clip_grads_", spy)
    cfg = make_cfg(tmp_path)
    torch.manual_seed(0)
    model = MoGETransformer(cfg.model, cfg.moe)
    x = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    model(x, x.roll(-1, 1)).loss.backward()
    grads = [p.grad.clone() for p in model.parameters()]
    grad_clip = factor * float(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads])))
    cfg.train.grad_clip = grad_clip
    ref = [torch.nn.Parameter(torch.zeros_like(g)) for g in grads]
    for r, g in zip(ref, grads):
        r.grad = g.clone()
    want = torch.nn.utils.clip_grad_norm_(ref, grad_clip)
    run = SimpleNamespace(model=model, world=single_process(), cfg=cfg)
    norm = loop._clip(1, run)
    assert bool(calls) == clips
    assert norm == float(want)
    for p, r in zip(model.parameters(), ref):
        assert torch.equal(p.grad, r.grad)
