"""The command line as a new user meets it: help texts with defaults, one-line errors
(moge bench too), no profiler noise, paths printed by `moge eval`, presets by name,
overrides named as the source of a bad value, and run folders that do not collide."""

from __future__ import annotations

import argparse
import os
import stat
from pathlib import Path

import pytest
import torch
import yaml

from moge.cli import _HelpFormatter, _Parser, build_parser, main
from moge.tools.bench import build_parser as bench_parser
from moge.tools.bench import peak_memory_bytes
from moge.training.config import default_out_dir, load_config, preset_names

ROOT = Path(__file__).resolve().parents[1]
TINY = {
    "model": {"d_model": 32, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "max_seq_len": 64},
    "moe": {"num_experts": 8, "num_groups": 4, "top_k": 4, "expert_hidden": 16},
    "data": {"seq_len": 32},
    "train": {"steps": 2, "batch_size": 2, "warmup_steps": 1, "eval_every": 0, "eval_batches": 1,
              "save_every": 0, "threads": 1},
    "eval": {"batches": 1, "batch_size": 2},
}  # fmt: skip


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def _parsers():
    subs = _subparsers(build_parser())
    subs["bench"] = bench_parser("moge bench", parser_class=_Parser, formatter_class=_HelpFormatter)
    return subs


PASSTHROUGH = ("torchrun",)  # its options are torchrun's own (moge torchrun --help)


@pytest.mark.parametrize("name", sorted(set(_parsers()) - set(PASSTHROUGH)))
def test_every_option_has_help_and_shows_its_default(name):
    """Every subcommand, including those added later: a help text and its default."""
    parser = _parsers()[name]
    text = parser.format_help()
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        assert action.help, f"moge {name} {action.dest}: no help text"
        shown = _HelpFormatter("x")._get_help_string(action)
        assert (
            "(default" in shown
            or "(required)" in shown
            or not action.option_strings
            and action.nargs
            in (
                None,
                "+",
            )
        ), (name, action.dest, shown)
    if any(a.option_strings and not a.required for a in parser._actions[1:]):
        assert "(default" in text


def test_help_shows_concrete_defaults():
    help_ = {n: " ".join(p.format_help().split()) for n, p in _parsers().items()}
    assert "(default: 64)" in help_["generate"] and "(default: 0.8)" in help_["generate"]
    assert "(required)" in help_["generate"]
    assert "(default: 300.0)" in help_["simulate"] and "(default: off)" in help_["simulate"]
    assert "(default: 10)" in help_["bench"] and "(default: small)" in help_["bench"]


@pytest.mark.parametrize(
    "argv, fragment",
    [
        (["bench", "--iters", "x"], "--iters: expected an integer, got 'x'"),
        (["bench", "--nope"], "unrecognized arguments"),
    ],
)
def test_bench_argument_errors_are_one_line(cli_error, argv, fragment):
    line = cli_error(argv)
    assert fragment in line and "moge bench --help" in line


def test_profiler_prints_nothing_on_stderr(capfd):
    peak = peak_memory_bytes(lambda: torch.ones(1000) * 2)
    captured = capfd.readouterr()
    assert peak > 0
    assert "USDT" not in captured.err and "profiler_start" not in captured.err, captured.err
    import sys

    print("stderr works again", file=sys.stderr)
    assert "stderr works again" in capfd.readouterr().err


# ------------------------------------------------------------------ configs and run folders


def test_a_config_is_named_by_preset(capsys):
    assert {"tiny-moge", "tiny-moe", "pangu-pro-moe-72b"} <= set(preset_names())
    assert main(["params", "tiny-moge"]) == 0
    assert capsys.readouterr().out.startswith("tiny-moge: total 3.6M")
    assert load_config("tiny-moge") == load_config(ROOT / "configs" / "tiny-moge.yaml")


def test_an_unknown_preset_lists_the_presets(cli_error):
    line = cli_error(["params", "tiny-mog"])
    assert "tiny-mog is neither a file nor a preset" in line and "tiny-moge" in line


@pytest.mark.parametrize(
    "override, field",
    [("moe.top_k=3", "moe.top_k"), ("moe.router=foo", "moe.router"), ("train.steps=x", "train.steps")],
)
def test_a_bad_override_is_named_as_the_source(cli_error, override, field):
    line = cli_error(["params", "configs/tiny-moge.yaml", override])
    assert line.startswith(f"error: {field}:") and line.endswith(f"(in override {override!r})"), line


def test_a_bad_value_in_the_file_is_named_as_the_file(tmp_path, cli_error):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump({**TINY, "moe": {**TINY["moe"], "top_k": 3}}))
    line = cli_error(["params", str(path), "train.steps=5"])
    assert line.endswith(f"(in {path})"), line


def test_default_out_dir_names_the_overrides():
    assert load_config("tiny-moge").train.out_dir is None  # runs/tiny-moge, as before
    cfg = load_config("tiny-moge", ["train.steps=50", "moe.router=global"])
    assert cfg.train.out_dir == "runs/tiny-moge,train.steps=50,moe.router=global"
    # Bookkeeping overrides do not move the run: resume finds the same folder.
    resumed = load_config(
        "tiny-moge", ["train.steps=50", "moe.router=global", "train.resume=true", "train.threads=1"]
    )
    assert resumed.train.out_dir == cfg.train.out_dir
    assert load_config("tiny-moge", ["train.resume=true"]).train.out_dir is None
    assert load_config("tiny-moge", ["train.out_dir=elsewhere", "train.steps=5"]).train.out_dir == "elsewhere"
    assert load_config("tiny-moge", ["name=x", "train.steps=5"]).train.out_dir == "runs/x,train.steps=5"
    assert default_out_dir("a", ["data.path=/tmp/my corpus.txt"]) == "runs/a,data.path=_tmp_my_corpus.txt"
    # Spaces around "=" do not change the override, so they do not change its run either.
    spaced = load_config("tiny-moge", ["train.steps = 50", " moe.router= global"])
    assert spaced.train.out_dir == cfg.train.out_dir and spaced.train.steps == 50
    long = default_out_dir("a", [f"train.seed={i}" for i in range(40)])
    assert len(Path(long).name) <= 111 and long != default_out_dir(
        "a", [f"train.seed={i}" for i in range(41)]
    )


def test_train_then_train_with_overrides_do_not_collide(tmp_path, monkeypatch, capsys):
    """The README's order: the plain run, then the same config with overrides."""
    monkeypatch.chdir(tmp_path)
    Path("tiny.yaml").write_text(yaml.safe_dump(TINY))
    n = torch.get_num_threads()
    assert main(["train", "tiny.yaml"]) == 0
    assert main(["train", "tiny.yaml", "moe.router=global"]) == 0
    assert main(["train", "tiny.yaml", "moe.router=global", "train.resume=true"]) == 0
    torch.set_num_threads(n)
    out = capsys.readouterr().out
    assert "-> runs/tiny\n" in out and "-> runs/tiny,moe.router=global\n" in out
    assert sorted(p.name for p in Path("runs").iterdir()) == ["tiny", "tiny,moe.router=global"]

    # moge eval prints every path it wrote; all files of the run share one mode.
    assert main(["eval", "runs/tiny"]) == 0
    printed = capsys.readouterr().out.splitlines()[-1]
    assert printed.startswith("wrote ")
    written = [Path(p) for p in printed[len("wrote ") :].split(", ")]
    names = {p.name for p in written}
    assert {"report.json", "routing_trace.safetensors", "training_curve.png"} <= names
    mask = os.umask(0)
    os.umask(mask)
    for p in written:
        assert p.exists() and stat.S_IMODE(p.stat().st_mode) == 0o666 & ~mask, (p, oct(p.stat().st_mode))


def test_generate_beyond_max_seq_len_says_the_limit(tmp_path, monkeypatch, cli_error):
    monkeypatch.chdir(tmp_path)
    Path("tiny.yaml").write_text(yaml.safe_dump(TINY))
    n = torch.get_num_threads()
    assert main(["train", "tiny.yaml", "train.steps=1"]) == 0
    torch.set_num_threads(n)
    line = cli_error(["generate", "runs/tiny,train.steps=1", "--prompt", "Hello", "--tokens", "60"])
    assert "5 bytes) + 60 new tokens = 65 exceed model.max_seq_len=64" in line
    assert "at most 59 new tokens fit" in line
