"""moge.tools.fingerprint: every statistic on hand-made profiles and weight files with known answers."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import save_file
from torch.testing import assert_close

from moge.cli import main
from moge.tools import fingerprint as fp
from moge.tools.fingerprint import Settings, compare_signals, interpolate, pearson, read_profile

FAST = Settings(permutations=500, bootstrap=200, seed=0)


# ---------------------------------------------------------------- statistics


def test_tensor_std_matches_torch_across_chunks(monkeypatch):
    t = torch.randn(37, 11, generator=torch.Generator().manual_seed(0)) * 3 + 5
    expected = float(t.double().std())
    assert fp.tensor_std(t) == pytest.approx(expected, rel=1e-12)
    monkeypatch.setattr(fp, "_CHUNK", 10)  # 41 chunks merged
    assert fp.tensor_std(t) == pytest.approx(expected, rel=1e-12)
    assert fp.tensor_std(torch.ones(5)) == 0.0
    assert fp.tensor_std(torch.ones(8, dtype=torch.bfloat16) * 2) == 0.0


def test_pearson_known_values():
    assert pearson([1, 2, 3], [2, 4, 6]) == pytest.approx(1.0)
    assert pearson([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    assert pearson([1, 2, 3], [1, 3, 2]) == pytest.approx(0.5)
    assert pearson([1, 2, 3], [5, 5, 5]) is None  # flat: undefined, not NaN
    with pytest.raises(ValueError, match="lengths differ"):
        pearson([1, 2, 3], [1, 2])


def test_z_normalise_and_flat():
    assert_close(
        torch.tensor(fp.z_normalise([1.0, 2.0, 3.0]), dtype=torch.float64),
        torch.tensor([-(1.5**0.5), 0.0, 1.5**0.5], dtype=torch.float64),
    )
    assert fp.z_normalise([0.02, 0.02, 0.02]) is None
    assert fp.is_flat([1.0, 1.0 + 1e-13]) and not fp.is_flat([1.0, 1.001])


def test_interpolate_known_values():
    assert interpolate([0.0, 1.0], 3) == pytest.approx([0.0, 0.5, 1.0])
    assert interpolate([0.0, 2.0, 4.0], 5) == pytest.approx([0.0, 1.0, 2.0, 3.0, 4.0])
    assert interpolate([3.0, 1.0, 2.0], 3) == pytest.approx([3.0, 1.0, 2.0])
    assert interpolate([0.0, 3.0, 0.0], 4) == pytest.approx([0.0, 2.0, 2.0, 0.0])


def _one(a, b, settings=FAST):
    return compare_signals({"q": a}, {"q": b}, ("q",), settings)


def test_exact_permutation_p_values_on_three_layers():
    # Of the 6 orders of B's 3 layers only the identity reaches r = 1.
    same = _one([1.0, 2.0, 3.0], [1.0, 2.0, 3.0])
    assert same.p_exact and same.r == pytest.approx(1.0) and same.p == pytest.approx(1 / 6)
    # r([1,2,3], [1,3,2]) = 0.5; the orders of B giving r >= 0.5: 123 (1), 132, 213 (0.5) -> 3/6.
    half = _one([1.0, 2.0, 3.0], [1.0, 3.0, 2.0])
    assert half.r == pytest.approx(0.5) and half.p == pytest.approx(0.5)
    # A reversed copy: r = -1, and every order reaches it.
    rev = _one([1.0, 2.0, 3.0], [3.0, 2.0, 1.0])
    assert rev.r == pytest.approx(-1.0) and rev.p == pytest.approx(1.0)


def test_monte_carlo_p_value_of_an_identical_profile_is_its_floor():
    a = torch.randn(12, generator=torch.Generator().manual_seed(1)).tolist()
    res = _one(a, a, Settings(permutations=300, bootstrap=50))
    assert not res.p_exact and res.r == pytest.approx(1.0)
    assert res.p == pytest.approx(1 / 301)  # no shuffle of 12 distinct values reaches r = 1
    assert res.ci == pytest.approx((1.0, 1.0)) and res.r_diff == pytest.approx(1.0)


def test_p_values_of_unrelated_random_profiles_are_roughly_uniform():
    gen = torch.Generator().manual_seed(2)
    ps = []
    for seed in range(120):
        a, b = torch.randn(2, 10, generator=gen).tolist()
        ps.append(_one(a, b, Settings(permutations=199, bootstrap=0, seed=seed)).p)
    mean = sum(ps) / len(ps)
    below = sum(p <= 0.05 for p in ps) / len(ps)
    assert 0.4 < mean < 0.6 and below < 0.12, (mean, below)


def test_p_value_is_small_for_a_strongly_related_noisy_copy():
    gen = torch.Generator().manual_seed(3)
    a = torch.randn(24, generator=gen)
    b = a + 0.3 * torch.randn(24, generator=gen)
    res = _one(a.tolist(), b.tolist())
    assert res.r > 0.9 and res.p < 0.01
    lo, hi = res.ci
    assert lo <= res.r <= hi and hi <= 1.0


def test_seeded_results_repeat():
    a, b = torch.randn(2, 16, generator=torch.Generator().manual_seed(4)).tolist()
    assert _one(a, b) == _one(a, b)


def test_a_shared_trend_fools_r_but_not_r_diff():
    # Two unrelated profiles that both rise with depth: r is high, its permutation p tiny,
    # while the layer-to-layer changes are independent noise.
    gen = torch.Generator().manual_seed(5)
    depth = torch.linspace(0, 1, 64)
    a = depth + 0.05 * torch.randn(64, generator=gen)
    b = depth + 0.05 * torch.randn(64, generator=gen)
    res = _one(a.tolist(), b.tolist())
    assert res.r > 0.9 and res.p < 0.01
    assert abs(res.r_diff) < 0.3  # its standard error here is about 1/sqrt(63) = 0.13


def test_different_depths_are_interpolated():
    line4, line7 = [1.0, 2.0, 3.0, 4.0], [0.5 + 0.25 * i for i in range(7)]
    res = _one(line4, line7)
    assert res.r == pytest.approx(1.0)
    # A 4-layer model against a 7-layer one that is its interpolation: identical profile.
    a = [0.3, 0.9, 0.1, 0.5]
    assert _one(a, interpolate(a, 7)).r == pytest.approx(1.0)
    assert _one(interpolate(a, 7), a).r == pytest.approx(1.0)
    # B (4 layers) is the one shuffled, before its interpolation: 4! = 24 orders, one reaches r = 1.
    res = _one(interpolate(a, 7), a, Settings(permutations=24, bootstrap=0))
    assert res.p_exact and res.p == pytest.approx(1 / 24)


def test_combined_row_is_the_mean_of_defined_signals():
    a = {"q": [1.0, 2.0, 3.0, 4.0], "k": [1.0, 2.0, 3.0, 4.0], "v": [1.0, 1.0, 1.0, 1.0], "o": None}
    b = {"q": [1.0, 2.0, 3.0, 4.0], "k": [4.0, 3.0, 2.0, 1.0], "v": [2.0, 3.0, 1.0, 0.0], "o": [1, 2, 3, 4]}
    res = compare_signals(a, b, fp.PROJ_SIGNALS, FAST, "qkvo")
    assert res.r == pytest.approx(0.0)  # mean of +1 and -1; v flat in A, o absent in A
    assert "mean of q,k" in res.note and "v flat in A" in res.note and "o absent in A" in res.note
    none = compare_signals({"q": [1.0] * 4}, {"q": [2.0] * 4}, ("q",), FAST)
    assert none.r is None and none.p is None and "flat in A and B" in none.note


# ---------------------------------------------------------------- weight files


def _moge_state(scales, *, bias=True, norm=None, d=8):
    """A moge-layout state dict whose layer i has q/k/v/o weights of std ~ scales[i]."""
    gen = torch.Generator().manual_seed(0)
    sd = {"embed.weight": torch.randn(16, d, generator=gen)}
    for i, s in enumerate(scales):
        for p in "qkvo":
            sd[f"blocks.{i}.attn.{p}_proj.weight"] = torch.randn(d, d, generator=gen) * s
            if bias and p != "o":
                sd[f"blocks.{i}.attn.{p}_proj.bias"] = torch.randn(d, generator=gen) * s
        sd[f"blocks.{i}.attn_norm.weight"] = (
            torch.ones(d) if norm is None else torch.full((d,), 1.0) + norm[i] * torch.arange(d)
        )
    return sd


def _hf_from_moge(sd):
    out = {}
    for key, value in sd.items():
        key = key.replace("blocks.", "model.layers.").replace(".attn.", ".self_attn.")
        out[key.replace("attn_norm", "input_layernorm")] = value
    return out


def _write_run(root, sd):
    """A minimal moge run folder: checkpoints/LATEST -> step folder with model.safetensors."""
    step = root / "checkpoints" / "step_00000010"
    step.mkdir(parents=True)
    (root / "checkpoints" / "LATEST").write_text("step_00000010\n")
    (step / "state.json").write_text("{}")
    save_file(sd, str(step / "model.safetensors"))
    return root


def _write_sharded(root, sd):
    root.mkdir(parents=True)
    keys = sorted(sd)
    shards = {"model-00001-of-00002.safetensors": keys[::2], "model-00002-of-00002.safetensors": keys[1::2]}
    for name, ks in shards.items():
        save_file({k: sd[k] for k in ks}, str(root / name))
    weight_map = {k: name for name, ks in shards.items() for k in ks}
    (root / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return root


SCALES = [0.02, 0.05, 0.03, 0.08, 0.04, 0.06]


def test_read_profile_moge_run_and_hf_shards_agree(tmp_path):
    sd = _moge_state(SCALES)
    run = read_profile(_write_run(tmp_path / "run", sd))
    hf = read_profile(_write_sharded(tmp_path / "hf", _hf_from_moge(sd)))
    assert (run.layout, hf.layout, run.n_layers, hf.n_layers) == ("moge", "hf", 6, 6)
    for i in range(6):
        assert run.values["q"][i] == pytest.approx(float(sd[f"blocks.{i}.attn.q_proj.weight"].double().std()))
        assert run.values["v_bias"][i] == pytest.approx(
            float(sd[f"blocks.{i}.attn.v_proj.bias"].double().std())
        )
    assert run.values == hf.values
    assert run.values["attn_norm"] == [0.0] * 6  # norms at init: a flat profile


def test_a_folder_with_a_single_file_and_an_index_reads_the_single_file(tmp_path):
    # transformers' from_pretrained (and moge's LayoutFolder) read model.safetensors before
    # an index; a sharded save over a single-file one leaves a folder holding both.
    old, new = _moge_state(SCALES), _moge_state(list(reversed(SCALES)))
    folder = _write_sharded(tmp_path / "hf", _hf_from_moge(old))
    save_file(_hf_from_moge(new), str(folder / "model.safetensors"))
    profile = read_profile(folder)
    for i in range(6):
        assert profile.values["q"][i] == pytest.approx(
            float(new[f"blocks.{i}.attn.q_proj.weight"].double().std())
        )


def test_model_against_itself_and_against_a_permuted_copy(tmp_path):
    sd = _moge_state(SCALES, norm=[0.1, 0.3, 0.2, 0.5, 0.4, 0.6])
    a = read_profile(_write_run(tmp_path / "a", sd))
    exact = Settings(permutations=720, bootstrap=100)
    rows = {r.signal: r for r in fp.compare_profiles(a, a, exact)}
    for name in ("q", "k", "v", "o", "q_bias", "attn_norm", "qkvo", "qkv_bias"):
        assert rows[name].r == pytest.approx(1.0), name
        assert rows[name].p_exact and rows[name].p == pytest.approx(1 / math.factorial(6)), name
    # Layers shuffled: each signal's r is the correlation of a with a[perm] (6 <= 720 -> exact p).
    perm = [3, 0, 5, 1, 4, 2]
    shuffled = {}
    for key, value in sd.items():
        parts = key.split(".")
        if parts[0] == "blocks":
            parts[1] = str(perm.index(int(parts[1])))  # new layer j holds old layer perm[j]
        shuffled[".".join(parts)] = value
    b = read_profile(_write_run(tmp_path / "b", shuffled))
    assert b.values["q"] == [a.values["q"][j] for j in perm]
    rows = {r.signal: r for r in fp.compare_profiles(a, b, exact)}
    assert rows["q"].r == pytest.approx(pearson(a.values["q"], b.values["q"]))
    assert rows["q"].r < 0.9 and rows["q"].p > 1 / 720


def test_flat_profile_is_reported_not_nan(tmp_path, capsys):
    a = _write_run(tmp_path / "a", _moge_state(SCALES, bias=False))
    b = _write_run(tmp_path / "b", _moge_state(SCALES[::-1], bias=False))
    result = fp.fingerprint([a, b], FAST, out_dir=tmp_path / "out")
    rows = {r["signal"]: r for r in result["pairs"][0]["rows"]}
    assert rows["attn_norm"]["r"] is None and "flat in A and B" in rows["attn_norm"]["note"]
    assert rows["q_bias"]["r"] is None and "absent" in rows["q_bias"]["note"]
    text = (tmp_path / "out" / "fingerprint.json").read_text()
    assert "NaN" not in text and "nan" not in result["text"]
    assert "undefined: attn_norm flat in A and B" in result["text"]
    assert (tmp_path / "out" / "fingerprint.png").stat().st_size > 0


def test_a_vision_tower_beside_the_decoder_is_left_out(tmp_path):
    sd = _moge_state(SCALES)
    keys = {
        k.replace("model.layers.", "model.language_model.layers."): v for k, v in _hf_from_moge(sd).items()
    }
    for i in range(2):  # a 2-layer encoder whose projections would overwrite layers 0 and 1
        for p in "qkvo":
            keys[f"model.vision_tower.encoder.layers.{i}.self_attn.{p}_proj.weight"] = torch.full((4, 4), 9.0)
    save_file(keys, str(tmp_path / "vlm.safetensors"))
    prof = read_profile(tmp_path / "vlm.safetensors")
    assert prof.n_layers == 6
    assert prof.values == read_profile(_write_run(tmp_path / "run", sd)).values


def test_missing_projection_and_unknown_layout_are_errors(tmp_path):
    sd = _moge_state(SCALES)
    del sd["blocks.2.attn.k_proj.weight"]
    save_file(sd, str(tmp_path / "holes.safetensors"))
    with pytest.raises(ValueError, match=r"layers \[2\] have no k_proj"):
        read_profile(tmp_path / "holes.safetensors")
    save_file({"w": torch.ones(2)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(ValueError, match="no attention projection weights"):
        read_profile(tmp_path / "other.safetensors")
    with pytest.raises(FileNotFoundError):
        read_profile(tmp_path / "nowhere")


def test_cli_fingerprint(tmp_path, capsys, cli_error):
    a = _write_run(tmp_path / "a", _moge_state(SCALES))
    hf = tmp_path / "hf"
    hf.mkdir()
    save_file(_hf_from_moge(_moge_state(SCALES[::-1])), str(hf / "model.safetensors"))
    code = main(
        [
            "fingerprint",
            str(a),
            str(hf),
            "--permutations",
            "100",
            "--bootstrap",
            "0",
            "--out",
            str(tmp_path / "o"),
        ]
    )
    out = capsys.readouterr().out
    assert code == 0
    assert "A = a (moge, 6 layers)   B = hf (hf, 6 layers)" in out
    assert "qkvo" in out and (tmp_path / "o" / "fingerprint.txt").is_file()
    assert main(["fingerprint", str(a), str(hf), str(a), "--permutations", "10", "--bootstrap", "0"]) == 0
    assert capsys.readouterr().out.count("A = ") == 3  # every pair of three models
    assert "needs at least two models" in cli_error(["fingerprint", str(a)])
    assert "no such model folder" in cli_error(["fingerprint", str(a), str(tmp_path / "missing")])
    assert "permutations" in cli_error(["fingerprint", str(a), str(hf), "--permutations", "-1"])


def test_non_finite_weights_are_an_error_not_a_nan_result(tmp_path):
    sd = _moge_state(SCALES)
    sd["blocks.1.attn.q_proj.weight"] = sd["blocks.1.attn.q_proj.weight"].clone()
    sd["blocks.1.attn.q_proj.weight"][0, 0] = float("nan")
    save_file(sd, str(tmp_path / "nan.safetensors"))
    with pytest.raises(ValueError, match=r"q weights of layers \[1\] hold non-finite values"):
        read_profile(tmp_path / "nan.safetensors")


@pytest.mark.parametrize("dtype", [torch.float8_e4m3fn, torch.int8])
def test_quantized_weights_are_an_error_not_a_profile_of_their_codes(tmp_path, dtype):
    # An FP8 release stores q_proj.weight as codes beside a weight_scale_inv: their std is
    # not the weights' (here it would not even follow the scales' rise with depth).
    sd = _hf_from_moge(_moge_state(SCALES, bias=False))
    key = "model.layers.3.self_attn.k_proj.weight"
    sd[key] = (sd[key] / sd[key].abs().max() * 100).to(dtype)
    sd[key.replace("weight", "weight_scale_inv")] = torch.ones(1, 1)
    save_file(sd, str(tmp_path / "quantized.safetensors"))
    with pytest.raises(ValueError, match=rf"{key} .*quantized.*{str(dtype).removeprefix('torch.')}"):
        read_profile(tmp_path / "quantized.safetensors")
