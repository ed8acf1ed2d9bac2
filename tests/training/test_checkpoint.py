"""Tests of moge/training/checkpoint.py (one process): atomic DCP safetensors checkpoints, pruning, loading errors."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from torch.testing import assert_close

import moge.training.checkpoint as ckpt_mod
from moge.model import MoGETransformer
from moge.training import build_optimizer
from moge.training.checkpoint import find_checkpoint, load_checkpoint, load_run, save_checkpoint
from moge.training.config import config_from_dict

SHARD = "shard-00001-model-00001-of-00001.safetensors"  # one process: one shard file
BASE = {
    "name": "ckpt-test",
    "model": {"d_model": 32, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "max_seq_len": 32},
    "moe": {"num_experts": 8, "num_groups": 4, "top_k": 4, "expert_hidden": 16, "num_shared_experts": 1,
            "learned_expert_scale": True, "bias_update_rate": 0.01},
    "data": {"seq_len": 16},
}  # fmt: skip


def make_cfg(d_model: int = 32, bias: bool = True):
    raw = json.loads(json.dumps(BASE))
    raw["model"]["d_model"] = d_model
    if not bias:
        raw["moe"]["bias_update_rate"] = 0.0
    return config_from_dict(raw)


def trained(seed: int = 0, steps: int = 2, **cfg_kw):
    """Model, optimizer and data generator after a few real steps (non-trivial state)."""
    cfg = make_cfg(**cfg_kw)
    torch.manual_seed(seed)
    model = MoGETransformer(cfg.model, cfg.moe).train()
    opt = build_optimizer(model, cfg.train)
    gen = torch.Generator().manual_seed(seed + 1)
    for _ in range(steps):
        x_BL = torch.randint(0, 256, (2, 16), generator=gen)
        model(x_BL, x_BL.roll(-1, 1)).loss.backward()
        opt.step()
        opt.zero_grad()
        for layer in model.moe_layers():
            layer.end_step()
    return cfg, model, opt, gen


def fresh(cfg, seed: int = 123):
    torch.manual_seed(seed)
    model = MoGETransformer(cfg.model, cfg.moe).train()
    return model, build_optimizer(model, cfg.train), torch.Generator().manual_seed(seed)


def test_round_trip_restores_model_optimizer_and_rng(tmp_path):
    cfg, model, opt, gen = trained()
    torch.manual_seed(77)
    folder = save_checkpoint(tmp_path, 2, model, opt, gen, cfg, keep_last=2)
    rng_saved = torch.get_rng_state()
    assert folder == tmp_path / "checkpoints" / "step_00000002"
    assert any(l.balance_bias_E.abs().sum() > 0 for l in model.moe_layers()), (
        "bias buffer must be non-trivial"
    )

    model2, opt2, gen2 = fresh(cfg)
    torch.manual_seed(999)
    assert load_checkpoint(tmp_path, model2, opt2, gen2) == 2
    assert_close(model2.state_dict(), model.state_dict(), rtol=0, atol=0)
    assert torch.equal(torch.get_rng_state(), rng_saved)
    assert torch.equal(gen2.get_state(), gen.get_state())
    for p, p2 in zip(model.parameters(), model2.parameters()):
        assert_close(opt2.state[p2], opt.state[p], rtol=0, atol=0)
    assert [g["weight_decay"] for g in opt2.param_groups] == [g["weight_decay"] for g in opt.param_groups]
    assert opt2.param_groups[0]["betas"] == opt.param_groups[0]["betas"]

    # One more identical step from both: the optimizer continues exactly.
    for m, o in ((model, opt), (model2, opt2)):
        x_BL = torch.arange(32).reshape(2, 16)
        m(x_BL, x_BL.roll(-1, 1)).loss.backward()
        o.step()
    assert_close(model2.state_dict(), model.state_dict(), rtol=0, atol=0)


def test_layout_latest_and_no_temp_left(tmp_path):
    cfg, model, opt, gen = trained()
    save_checkpoint(tmp_path, 5, model, opt, gen, cfg, keep_last=2)
    root = tmp_path / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == ["LATEST", "step_00000005"]
    folder = root / "step_00000005"
    names = sorted(p.name for p in folder.iterdir())
    assert names == ["rng.safetensors", SHARD, "state.json", "state.json.sha256"]
    assert (root / "LATEST").read_text().strip() == "step_00000005"
    state = json.loads((folder / "state.json").read_text())
    assert state["step"] == 5 and config_from_dict(state["config"]) == cfg
    assert sorted(state["files"]) == ["rng.safetensors", SHARD] and state["world"]["size"] == 1
    with safe_open(str(folder / SHARD), framework="pt") as f:  # DCP's layout is JSON in the header
        keys, header = set(f.keys()), f.metadata()
    assert "optim.blocks.0.ffn.router.weight.exp_avg" in keys and "model.embed.weight" in keys
    assert json.loads(header["DCP_SHARDING_INFO"])["model.embed.weight"]["saved_offsets"] == [0, 0]
    assert set(load_file(str(folder / "rng.safetensors"))) == {"torch_cpu", "data_gen"}


def test_failed_save_keeps_previous_checkpoint(tmp_path, monkeypatch):
    cfg, model, opt, gen = trained()
    save_checkpoint(tmp_path, 1, model, opt, gen, cfg, keep_last=1)
    real_save = ckpt_mod.save_file

    def crash_on_rng(tensors, path, metadata=None):  # after the shards are written
        if path.endswith("rng.safetensors"):
            raise OSError("disk full")
        real_save(tensors, path, metadata=metadata)

    monkeypatch.setattr(ckpt_mod, "save_file", crash_on_rng)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(tmp_path, 2, model, opt, gen, cfg, keep_last=1)
    root = tmp_path / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == ["LATEST", "step_00000001"]
    assert find_checkpoint(tmp_path).name == "step_00000001"


def test_shard_write_disk_error_names_the_os_reason(tmp_path, monkeypatch):
    # DCP reports every rank's failure as (exception, traceback summary) pairs.
    from torch.distributed.checkpoint.api import CheckpointException, _wrap_exception

    cfg, model, opt, gen = trained()

    def full_disk(*args, **kwargs):
        try:
            raise OSError(28, "No space left on device")
        except OSError as err:
            raise CheckpointException("save failed", {0: _wrap_exception(err)}) from None

    monkeypatch.setattr(ckpt_mod.dcp, "save", full_disk)
    with pytest.raises(OSError, match=r"writing the shards failed \(No space left on device\)\)"):
        save_checkpoint(tmp_path, 1, model, opt, gen, cfg, keep_last=1)


def test_a_stale_temp_that_cannot_go_does_not_fail_a_published_save(tmp_path, monkeypatch):
    # Once LATEST names the new step the save has happened: clearing an old crash's temp
    # file is best effort, like pruning, and must not report the save as failed.
    cfg, model, opt, gen = trained()
    save_checkpoint(tmp_path, 1, model, opt, gen, cfg, keep_last=2)
    stale = tmp_path / "checkpoints" / ".tmp-LATEST-crashed"
    stale.write_text("step_00000001\n")
    real_unlink = Path.unlink

    def refuse_stale(self, missing_ok=False):
        if self.name == stale.name:
            raise PermissionError(13, "Permission denied", str(self))
        return real_unlink(self, missing_ok=missing_ok)

    monkeypatch.setattr(Path, "unlink", refuse_stale)
    assert save_checkpoint(tmp_path, 2, model, opt, gen, cfg, keep_last=2).name == "step_00000002"
    monkeypatch.undo()
    assert find_checkpoint(tmp_path).name == "step_00000002" and stale.exists()


def test_keep_last_prunes_oldest_and_latest_is_newest(tmp_path):
    cfg, model, opt, gen = trained()
    for step in (1, 2, 3, 4):
        save_checkpoint(tmp_path, step, model, opt, gen, cfg, keep_last=2)
    root = tmp_path / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == ["LATEST", "step_00000003", "step_00000004"]
    assert find_checkpoint(tmp_path) == root / "step_00000004"
    save_checkpoint(tmp_path, 4, model, opt, gen, cfg, keep_last=2)  # the same step again replaces it
    assert sorted(p.name for p in root.iterdir()) == ["LATEST", "step_00000003", "step_00000004"]


@pytest.mark.parametrize("damage", ["flip", "truncate", "truncate_unlisted"])
def test_corrupted_or_truncated_file_names_it(tmp_path, damage):
    cfg, model, opt, gen = trained()
    folder = save_checkpoint(tmp_path, 1, model, opt, gen, cfg, keep_last=1)
    file = folder / SHARD
    data = bytearray(file.read_bytes())
    if damage == "flip":
        data[-5] ^= 0xFF
        file.write_bytes(bytes(data))
    else:
        file.write_bytes(bytes(data[: len(data) // 2]))
    if damage == "truncate_unlisted":  # its entry dropped (state.json re-signed): still refused
        state = json.loads((folder / "state.json").read_text())
        del state["files"][SHARD]
        data = json.dumps(state).encode()
        (folder / "state.json").write_bytes(data)
        (folder / "state.json.sha256").write_text(hashlib.sha256(data).hexdigest())
    with pytest.raises(ValueError, match=SHARD) as err:
        load_checkpoint(tmp_path, fresh(cfg)[0])
    expected = {"flip": "corrupted", "truncate": "truncated", "truncate_unlisted": "does not list"}[damage]
    assert expected in str(err.value)


def test_wrong_architecture_names_file_and_keys(tmp_path):
    cfg, model, opt, gen = trained()
    save_checkpoint(tmp_path, 1, model, opt, gen, cfg, keep_last=1)
    other = make_cfg(d_model=48)
    with pytest.raises(
        ValueError,
        match=r"step_00000001: another architecture \(shape mismatch\).*embed\.weight saved \(256, 32\)",
    ):
        load_checkpoint(tmp_path, MoGETransformer(other.model, other.moe))


def test_missing_and_extra_keys_are_named(tmp_path):
    cfg, model, opt, gen = trained(bias=True)
    save_checkpoint(tmp_path / "a", 1, model, opt, gen, cfg, keep_last=1)
    plain = make_cfg(bias=False)
    with pytest.raises(
        ValueError,
        match=r"step_00000001: does not match the model; unexpected keys: blocks\.0\.ffn\.balance_bias_E",
    ):
        load_checkpoint(tmp_path / "a", MoGETransformer(plain.model, plain.moe))
    cfg_b, model_b, opt_b, gen_b = trained(bias=False)
    save_checkpoint(tmp_path / "b", 1, model_b, opt_b, gen_b, cfg_b, keep_last=1)
    with pytest.raises(ValueError, match=r"missing keys: blocks\.0\.ffn\.balance_bias_E"):
        load_checkpoint(tmp_path / "b", fresh(cfg)[0])


def test_missing_run_or_checkpoint(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope"):
        load_run(tmp_path / "nope")
    (tmp_path / "run").mkdir()
    with pytest.raises(FileNotFoundError, match="LATEST"):
        load_run(tmp_path / "run")
    cfg, model, opt, gen = trained()
    folder = save_checkpoint(tmp_path / "run", 1, model, opt, gen, cfg, keep_last=1)
    (folder / "rng.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="rng.safetensors"):
        load_checkpoint(tmp_path / "run", fresh(cfg)[0], data_gen=torch.Generator())


def test_load_run_builds_model_from_saved_config(tmp_path):
    cfg, model, opt, gen = trained()
    save_checkpoint(tmp_path, 3, model, opt, gen, cfg, keep_last=1)
    loaded, cfg2, step = load_run(tmp_path)
    assert step == 3 and cfg2 == cfg and not loaded.training
    x_BL = torch.arange(16)[None]
    assert_close(loaded(x_BL).logits, model.eval()(x_BL).logits, rtol=0, atol=0)


def test_load_run_skips_the_init_and_fills_every_tensor(tmp_path, monkeypatch):
    cfg, model, opt, gen = trained()
    save_checkpoint(tmp_path, 3, model, opt, gen, cfg, keep_last=1)
    ref = MoGETransformer(cfg.model, cfg.moe)  # a fresh model's buffers

    def no_init(self, *args, **kwargs):
        raise AssertionError("load_run initialised weights the checkpoint overwrites")

    monkeypatch.setattr(MoGETransformer, "init_weights", no_init)
    loaded, _, _ = load_run(tmp_path)
    want = model.state_dict()
    got = loaded.state_dict()
    assert got.keys() == want.keys()
    for k, v in want.items():  # bitwise: parameters and persistent buffers (the balance biases)
        assert_close(got[k], v, rtol=0, atol=0, msg=k)
    # Buffers not in the checkpoint come from the config, as in a fresh model.
    for (name, b), (_, r) in zip(loaded.named_buffers(), ref.named_buffers()):
        if name not in want:
            assert_close(b, r, rtol=0, atol=0, msg=name)
