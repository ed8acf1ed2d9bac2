"""The CUDA paths against the reference loop and against the CPU.

Skipped without a CUDA device (CI has none). scripts/check_cuda.sh runs this module and
the CUDA benchmark where a GPU is lent; docs/performance.md ("On an NVIDIA H200") has
what they printed. TF32 stays off, so float32 products are float32 and the comparisons
below use float32 tolerances.
"""

from __future__ import annotations

import pytest
import torch
from expert_cases import assert_within_bf16_error, case, grads, set_layout
from reference import all_grads, reference_experts, reference_layer, within_bf16_error
from torch.testing import assert_close

from moge import MoGEConfig, MoGELayer
from moge.model import MoGETransformer
from moge.model.config import ModelConfig
from moge.routing import RouterSettings, route
from moge.testing import assert_group_quota

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
CUDA = torch.device("cuda")


@pytest.fixture(autouse=True)
def _no_tf32():
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def cuda_case(**kw):
    x, ids, w, experts = case(**kw)
    return x.to(CUDA), ids.to(CUDA), w.to(CUDA), experts.to(CUDA)


def reference_grads(x, ids, w, experts):
    ref = lambda x, w: reference_experts(x, ids, w, experts.w_gate_up_EDH, experts.w_down_EFD)  # noqa: E731
    return grads(ref, x, w, experts)


# --- experts ----------------------------------------------------------------------------------


@pytest.mark.parametrize("impl", ["fused", "grouped_mm", "loop"])
@pytest.mark.parametrize("skip", [None, 2])
def test_expert_paths_match_reference_float32(impl, skip):
    x, ids, w, experts = cuda_case(T=61, skip_expert=skip)
    experts.impl = impl
    fast = grads(lambda x, w: experts(x, ids, w), x, w, experts)
    for a, b in zip(fast, reference_grads(x, ids, w, experts)):
        assert a.device.type == CUDA.type
        assert_close(a, b)
    if skip is not None:  # an expert with no tokens gets an exact zero gradient
        assert fast[3][skip].abs().sum() == 0 and fast[4][skip].abs().sum() == 0


@pytest.mark.parametrize("layout", [None, (1, 1, 0.0, None), (8, 3, 100.0, None), (1, 3, 0.0, 768)])
def test_fused_layouts_match_reference_float32(layout):
    """Per-expert mm, padded bmm chunks, and many token blocks (tiny chunk_bytes)."""
    x, ids, w, experts = cuda_case(T=97, E=6, K=3)
    if layout is not None:
        set_layout(experts, *layout)
    experts.impl = "fused"
    fast = grads(lambda x, w: experts(x, ids, w), x, w, experts)
    for a, b in zip(fast, reference_grads(x, ids, w, experts)):
        assert_close(a, b)


@pytest.mark.parametrize("impl", ["fused", "grouped_mm"])
@pytest.mark.parametrize("chunk_bytes", [None, 768])
def test_expert_paths_bfloat16_within_bf16_error(impl, chunk_bytes):
    x, ids, w, experts = cuda_case(T=256, D=64, Fh=32, E=8, K=2, dtype=torch.bfloat16, seed=1)
    experts.impl = impl
    if chunk_bytes is not None:
        experts.chunk_bytes = chunk_bytes  # many token blocks: the float32 weight-gradient buffer
    fast, exact = assert_within_bf16_error(x, ids, w, experts)
    assert fast[0].dtype == torch.bfloat16 and fast[0].device.type == CUDA.type
    for a, c in zip(fast, exact):  # and not near zero: errors relative to the values' scale
        assert_close(a.float(), c, atol=0.03 * c.abs().max().item(), rtol=0.03)


# --- the layer --------------------------------------------------------------------------------


def make_layer(**kw) -> MoGELayer:
    base = dict(d_model=32, num_experts=8, num_groups=4, top_k=4, expert_hidden=24, num_shared_experts=1)
    torch.manual_seed(0)
    layer = MoGELayer(MoGEConfig(**{**base, **kw, "learned_expert_scale": True}))
    with torch.no_grad():
        layer.expert_scale_E.uniform_(0.5, 1.5)
    return layer


@pytest.mark.parametrize("impl", ["auto", "fused", "grouped_mm"])
@pytest.mark.parametrize("router", ["grouped", "global"])
def test_layer_matches_reference_and_cpu_float32(impl, router):
    cpu = make_layer(router=router, expert_impl=impl)
    layer = make_layer(router=router, expert_impl=impl).to(CUDA)
    x = torch.randn(4, 19, 32, generator=torch.Generator().manual_seed(1))
    fast = all_grads(layer, x.to(CUDA), lambda x: layer(x).hidden)
    ref = all_grads(layer, x.to(CUDA), lambda x: reference_layer(layer, x)[0])
    on_cpu = all_grads(cpu, x, lambda x: cpu(x).hidden)
    for a, b, c in zip(fast, ref, on_cpu):
        assert_close(a, b)
        assert_close(a.cpu(), c)
    out, out_cpu = layer(x.to(CUDA)), cpu(x)
    assert torch.equal(out.expert_ids.cpu(), out_cpu.expert_ids)
    assert_close(out.aux_loss.cpu(), out_cpu.aux_loss)


@pytest.mark.parametrize("impl", ["auto", "fused"])
def test_layer_bfloat16_within_bf16_error(impl):
    layer = make_layer(expert_impl=impl).to(CUDA, torch.bfloat16)
    x = torch.randn(256, 32, generator=torch.Generator().manual_seed(2)).to(CUDA, torch.bfloat16)
    out = layer(x)
    assert out.hidden.dtype == torch.bfloat16 and out.scores.dtype == torch.float32
    ref, ref_ids = reference_layer(layer, x)
    assert torch.equal(out.expert_ids, ref_ids)
    fast = all_grads(layer, x, lambda x: layer(x).hidden)
    slow = all_grads(layer, x, lambda x: reference_layer(layer, x)[0])
    exact_layer = make_layer(expert_impl=impl).to(CUDA)
    exact_layer.load_state_dict({k: v.float() for k, v in layer.state_dict().items()})
    exact = all_grads(exact_layer, x.float(), lambda x: reference_layer(exact_layer, x)[0])
    names = ["y", "dx"] + [n for n, _ in layer.named_parameters()]
    within_bf16_error(fast, slow, exact, names)


@pytest.mark.parametrize("impl", ["fused", "grouped_mm"])
def test_layer_is_deterministic_on_cuda(impl):
    """Dispatch and combine gather on CUDA (no index_add_): two runs agree bit for bit."""
    layer = make_layer(expert_impl=impl).to(CUDA, torch.bfloat16)
    x = torch.randn(512, 32, generator=torch.Generator().manual_seed(3)).to(CUDA, torch.bfloat16)
    first = all_grads(layer, x, lambda x: layer(x).hidden)
    second = all_grads(layer, x, lambda x: layer(x).hidden)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


@pytest.mark.parametrize("aux_loss_type", ["batch", "global_batch"])
def test_a_bf16_training_call_never_waits_on_the_device(aux_loss_type):
    """No host sync in the layer's bf16 forward and backward (expert_impl auto:
    grouped_mm): the host keeps queueing work while the GPU runs. torch raises on any
    sync here. (In float32, torch 2.11's _grouped_mm itself reads the offsets back.)"""
    layer = make_layer(aux_loss_type=aux_loss_type, z_loss_coef=1e-3).to(CUDA, torch.bfloat16)
    x = torch.randn(512, 32, generator=torch.Generator().manual_seed(7)).to(CUDA, torch.bfloat16)
    all_grads(layer, x, lambda x: layer(x).hidden)  # warm-up: lazy inits may sync once
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = layer(x.requires_grad_())
        (out.hidden.float().square().sum() + out.aux_loss).backward()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert x.grad is not None and layer.router.weight.grad is not None


@pytest.mark.parametrize("router", ["grouped", "global", "group_limited"])
def test_routers_on_cuda_match_cpu(router):
    gen = torch.Generator().manual_seed(4)
    scores = torch.randn(300, 16, generator=gen).softmax(-1)
    settings = RouterSettings(router=router, top_k=4, num_groups=4, topk_groups=2)
    w_cpu, ids_cpu = route(scores, settings)
    w, ids = route(scores.to(CUDA), settings)
    assert torch.equal(ids.cpu(), ids_cpu)
    assert_close(w.cpu(), w_cpu)
    if router == "grouped":
        assert_group_quota(ids, num_experts=16, num_groups=4, top_k=4)


# --- the model, decoding and training ----------------------------------------------------------


def tiny_model() -> MoGETransformer:
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=48)
    moe = MoGEConfig(
        d_model=32, num_experts=8, num_groups=4, top_k=4, expert_hidden=16, num_shared_experts=1,
        learned_expert_scale=True, aux_loss_coef=0.01,
    )  # fmt: skip
    return MoGETransformer(cfg, moe)


def test_model_matches_cpu_forward_and_backward():
    cpu = tiny_model()
    model = tiny_model().to(CUDA)
    gen = torch.Generator().manual_seed(5)
    x, y = torch.randint(0, 64, (3, 24), generator=gen), torch.randint(0, 64, (3, 24), generator=gen)
    out, out_cpu = model(x.to(CUDA), y.to(CUDA)), cpu(x, y)
    out.loss.backward()
    out_cpu.loss.backward()
    assert_close(out.logits.cpu(), out_cpu.logits, atol=1e-5, rtol=1e-4)
    assert_close(out.loss.cpu(), out_cpu.loss)
    for (name, p), q in zip(model.named_parameters(), cpu.parameters()):
        assert_close(p.grad.cpu(), q.grad, atol=1e-6, rtol=1e-4, msg=name)


def test_generate_with_cache_matches_full_recompute():
    model = tiny_model().to(CUDA).eval()
    prompt = torch.randint(0, 64, (2, 5), generator=torch.Generator().manual_seed(6)).to(CUDA)
    out = model.generate(prompt, 12, temperature=0.0)
    seq = prompt
    with torch.no_grad():
        for _ in range(12):
            seq = torch.cat([seq, model(seq).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(out, seq)


def test_fresh_optimizer_state_is_what_torchs_first_step_makes():
    """A checkpoint loads into state made ahead of the first step (init_optimizer_state):
    it must sit where torch's own fused AdamW puts it (`step` on the GPU, not the CPU)."""
    from moge.training.checkpoint import init_optimizer_state
    from moge.training.config import TrainConfig
    from moge.training.optim import build_optimizer

    made, stepped = tiny_model().to(CUDA), tiny_model().to(CUDA)
    ahead, real = build_optimizer(made, TrainConfig()), build_optimizer(stepped, TrainConfig())
    init_optimizer_state(made, ahead)
    for p in stepped.parameters():
        p.grad = torch.zeros_like(p)
    real.step()
    for p, q in zip(made.parameters(), stepped.parameters()):
        a, b = ahead.state[p], real.state[q]
        assert sorted(a) == sorted(b)
        for key in a:
            assert (a[key].device, a[key].dtype, a[key].shape) == (
                b[key].device,
                b[key].dtype,
                b[key].shape,
            ), key


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_train_on_cuda_lowers_the_loss_and_resumes(tmp_path, dtype):
    from moge.training import train
    from moge.training.config import config_from_dict

    raw = {
        "name": "cuda-tiny",
        "model": {"d_model": 64, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "max_seq_len": 64},
        "moe": {"num_experts": 8, "num_groups": 4, "top_k": 4, "expert_hidden": 32},
        "data": {"seq_len": 64},
        "train": {"steps": 60, "batch_size": 8, "warmup_steps": 5, "eval_every": 0, "eval_batches": 2,
                  "save_every": 30, "device": "cuda", "dtype": dtype, "out_dir": str(tmp_path / "run")},
    }  # fmt: skip
    cfg = config_from_dict(raw)
    half = train(cfg, progress=False, stop_at=30)
    assert half.step == 30
    resumed = config_from_dict({**raw, "train": {**raw["train"], "resume": True}})
    done = train(resumed, progress=False)
    assert done.step == 60 and done.val_loss is not None
    assert done.val_loss < 0.8 * 5.55  # ln(256) = 5.55: the untrained model's loss
