"""moge fingerprint on folders written by the real client (transformers) in every interop layout."""

from __future__ import annotations

import pytest
import torch
from hf_cases import LAYOUT_NAMES, hf_model
from torch.testing import assert_close

from moge.interop import convert
from moge.tools.fingerprint import Settings, compare_profiles, read_profile


def _std(t) -> float:
    return float(t.detach().double().std())


@pytest.mark.parametrize("layout", LAYOUT_NAMES)
def test_fingerprint_reads_transformers_folders_and_their_moge_conversion(layout, tmp_path):
    model = hf_model(layout)
    folder = tmp_path / layout
    model.save_pretrained(folder, max_shard_size="40KB")  # several shards + model.safetensors.index.json
    assert (folder / "model.safetensors.index.json").is_file()
    prof = read_profile(folder)
    layers = model.model.layers
    assert prof.layout == "hf" and prof.n_layers == len(layers)
    for p in "qkvo":
        expected = [_std(getattr(layer.self_attn, f"{p}_proj").weight) for layer in layers]
        assert_close(torch.tensor(prof.values[p]), torch.tensor(expected), rtol=1e-12, atol=0)
    assert_close(
        torch.tensor(prof.values["attn_norm"]),
        torch.tensor([_std(layer.input_layernorm.weight) for layer in layers]),
    )
    has_bias = layers[0].self_attn.q_proj.bias is not None
    assert (prof.values["q_bias"] is not None) == has_bias
    if has_bias:
        assert_close(
            torch.tensor(prof.values["v_bias"]),
            torch.tensor([_std(layer.self_attn.v_proj.bias) for layer in layers]),
        )
    # The same weights as a moge run (moge convert): the same profiles, read under moge's names.
    convert(folder, tmp_path / "run", to="moge")
    run = read_profile(tmp_path / "run")
    assert run.layout == "moge"
    for signal, values in prof.values.items():
        if values is None:
            assert run.values[signal] is None
        else:
            assert_close(torch.tensor(run.values[signal]), torch.tensor(values), rtol=1e-6, atol=0)
    if prof.n_layers >= 3:
        rows = {r.signal: r for r in compare_profiles(prof, run, Settings(permutations=6, bootstrap=0))}
        assert rows["qkvo"].r == pytest.approx(1.0) and rows["qkvo"].p == pytest.approx(1 / 6)


def test_fingerprint_of_a_pangu_export_equals_the_run(tmp_path):
    from moge.training import train
    from moge.training.config import config_from_dict

    cfg = config_from_dict({
        "name": "pangu-fp",
        "model": {"d_model": 32, "n_layers": 3, "n_heads": 4, "n_kv_heads": 2, "max_seq_len": 32, "qkv_bias": True,
                  "o_bias": True},
        "moe": {"num_experts": 8, "num_groups": 4, "top_k": 4, "expert_hidden": 16, "num_shared_experts": 1,
                "learned_expert_scale": True},
        "data": {"seq_len": 32},
        "train": {"steps": 2, "batch_size": 2, "warmup_steps": 1, "eval_every": 0, "eval_batches": 1,
                  "save_every": 0, "threads": 1, "out_dir": str(tmp_path / "run")},
    })  # fmt: skip
    n = torch.get_num_threads()
    train(cfg, progress=False)
    torch.set_num_threads(n)
    convert(tmp_path / "run", tmp_path / "pangu", to="pangu", max_shard_bytes=30_000)
    run, pangu = read_profile(tmp_path / "run"), read_profile(tmp_path / "pangu")
    assert (run.layout, pangu.layout, pangu.n_layers) == ("moge", "hf", 3)
    assert pangu.values.keys() == run.values.keys()
    for signal, values in run.values.items():
        assert values is not None, signal  # qkv biases trained 2 steps: present and not all zero
        assert_close(torch.tensor(pangu.values[signal]), torch.tensor(values), rtol=1e-6, atol=0)
