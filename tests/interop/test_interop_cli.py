"""`moge convert`, and `moge eval` / `moge generate` on a layout folder."""

from __future__ import annotations

import hashlib
import json

import pytest
import torch
import yaml

from moge.cli import CONVERT_LAYOUTS, main
from moge.interop import LAYOUTS, MOGE, from_pretrained
from moge.training.checkpoint import find_checkpoint, load_run, read_tensors

TINY = {
    "model": {"d_model": 32, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "max_seq_len": 64},
    "moe": {"num_experts": 8, "num_groups": 4, "top_k": 4, "expert_hidden": 16, "num_shared_experts": 1,
            "learned_expert_scale": True},
    "data": {"seq_len": 32},
    "train": {"steps": 3, "batch_size": 2, "warmup_steps": 1, "eval_every": 0, "eval_batches": 1,
              "save_every": 0, "threads": 1},
    "eval": {"batches": 1, "batch_size": 2, "plots": False},
}  # fmt: skip


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("convert")
    config = folder / "tiny.yaml"
    config.write_text(yaml.safe_dump(TINY))
    n = torch.get_num_threads()
    assert main(["train", str(config), f"train.out_dir={folder / 'run'}"]) == 0
    torch.set_num_threads(n)
    return folder / "run"


def _model_tensors(run_dir) -> dict[str, torch.Tensor]:
    """The model's tensors of a run's newest checkpoint (verified, read from its shards)."""
    return {k[6:]: v for k, v in read_tensors(run_dir).items() if k.startswith("model.")}


def test_cli_lists_every_layout():
    assert set(CONVERT_LAYOUTS) == {*LAYOUTS, MOGE}


def test_convert_to_pangu_and_back_keeps_every_tensor(run, tmp_path, capsys):
    pangu, back = tmp_path / "pangu", tmp_path / "back"
    assert main(["convert", str(run), str(pangu), "--to", "pangu", "--max-shard-bytes", "30000"]) == 0
    index = json.loads((pangu / "model.safetensors.index.json").read_text())
    assert "model.layers.1.mlp.router_scale" in index["weight_map"]
    assert main(["convert", str(pangu), str(back), "--to", "moge"]) == 0
    original, again = _model_tensors(run), _model_tensors(back)
    assert {k for k in read_tensors(back) if not k.startswith("model.")} == {"rng.torch_cpu", "rng.data_gen"}
    for k, v in original.items():
        assert torch.equal(v, again[k]), k
    # The run had no attention biases; the Pangu layout always has them: zeros, the same model.
    added = set(again) - set(original)
    assert added and all(k.endswith("_proj.bias") and not again[k].any() for k in added)
    model, cfg, step = load_run(back)
    assert step == 0 and cfg.moe.router == "grouped"


def test_convert_casts_dtype(run, tmp_path):
    assert main(["convert", str(run), str(tmp_path / "bf16"), "--to", "pangu", "--dtype", "bfloat16"]) == 0
    model, _ = from_pretrained(tmp_path / "bf16", dtype=None)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}


def test_convert_to_a_moge_run_refuses_a_cast(run, tmp_path, capsys):
    """A run holds float32 weights (every command loads it so); a bf16 one could not be read."""
    assert main(["convert", str(run), str(tmp_path / "r"), "--to", "moge", "--dtype", "bfloat16"]) == 2
    assert "--dtype: a moge run holds float32 weights" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


def test_generate_and_eval_read_a_layout_folder(run, tmp_path, capsys):
    pangu = tmp_path / "pangu"
    assert main(["convert", str(run), str(pangu), "--to", "pangu"]) == 0
    capsys.readouterr()
    args = ["--prompt", "The with", "--tokens", "12", "--temperature", "0"]
    assert main(["generate", str(run), *args]) == 0
    from_run = capsys.readouterr().out
    assert main(["generate", str(pangu), *args]) == 0
    assert capsys.readouterr().out == from_run
    assert main(["eval", str(pangu), "--batches", "1"]) == 0
    report = json.loads((pangu / "report.json").read_text())
    assert report["step"] == 0 and report["moe"]["router"] == "grouped"


def test_grouped_run_to_a_transformers_layout_is_one_error_line(run, tmp_path, capsys):
    code = main(["convert", str(run), str(tmp_path / "q"), "--to", "qwen3_moe"])
    err = capsys.readouterr().err.splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("error: ")
    assert "transformers has no MoGE" in err[0] and "--to pangu" in err[0]
    assert not (tmp_path / "q").exists()


def test_convert_errors(run, tmp_path, capsys):
    assert main(["convert", str(tmp_path / "nothing"), str(tmp_path / "x"), "--to", "pangu"]) == 2
    assert "nothing" in capsys.readouterr().err
    assert main(["convert", str(run), str(tmp_path / "x"), "--to", "gpt2"]) == 2
    assert "invalid choice" in capsys.readouterr().err


def test_checkpoint_that_does_not_fit_its_config_names_the_key(run, tmp_path, capsys):
    import shutil

    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    state_file = find_checkpoint(copy) / "state.json"
    state = json.loads(state_file.read_text())
    state["config"]["moe"]["expert_hidden"] = 12
    state_file.write_text(json.dumps(state))  # a consistent manifest (its digest too) of a wrong config
    digest = hashlib.sha256(state_file.read_bytes()).hexdigest()
    state_file.with_name("state.json.sha256").write_text(digest + "\n")
    assert main(["convert", str(copy), str(tmp_path / "p"), "--to", "pangu"]) == 2
    err = capsys.readouterr().err
    assert "blocks.0.ffn.experts.w_gate_up_EDH: expected shape [8, 32, 24], found [8, 32, 32]" in err


def test_top_level_api_reads_runs_and_writes_layouts(run, tmp_path):
    import moge

    model, cfg = moge.from_pretrained(run)
    ref, _, _ = load_run(run)
    for k, v in ref.state_dict().items():
        assert torch.equal(model.state_dict()[k], v), k
    files = model.save_pretrained(tmp_path / "p", layout="pangu")
    assert [f.name for f in files] == ["model.safetensors"]
    again, _ = moge.from_pretrained(tmp_path / "p")
    x = torch.randint(0, 256, (1, 8))
    with torch.no_grad():  # the Pangu layout adds zero attention biases: equal up to rounding
        torch.testing.assert_close(again(x).logits, model(x).logits, atol=1e-6, rtol=1e-6)


def test_convert_never_writes_into_a_folder_that_holds_something(run, tmp_path, capsys):
    """An existing run (its checkpoints, optimizer state, config) or model folder is left
    as it was: one error line; an empty folder is fine."""
    import shutil

    busy = tmp_path / "busy"
    shutil.copytree(run, busy)
    before = {p: p.read_bytes() for p in sorted(busy.rglob("*")) if p.is_file()}
    pangu = tmp_path / "pangu"
    assert main(["convert", str(run), str(pangu), "--to", "pangu"]) == 0
    for src, to in ((pangu, "moge"), (run, "pangu"), (run, "moge")):
        assert main(["convert", str(src), str(busy), "--to", to]) == 2
        err = capsys.readouterr().err.splitlines()
        assert len(err) == 1 and "is not an empty folder" in err[0], err
    assert {p: p.read_bytes() for p in sorted(busy.rglob("*")) if p.is_file()} == before
    (tmp_path / "empty").mkdir()
    assert main(["convert", str(pangu), str(tmp_path / "empty"), "--to", "moge"]) == 0
