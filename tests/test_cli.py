"""Tests of moge/cli.py: the subcommands, and one-line errors with exit code 2."""

from __future__ import annotations

import runpy
import sys
import types
from pathlib import Path

import pytest
import torch
import yaml

import moge.training
from moge.cli import build_parser, main

ROOT = Path(__file__).resolve().parents[1]
TINY = {
    "model": {"d_model": 32, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "max_seq_len": 64},
    "moe": {"num_experts": 8, "num_groups": 4, "top_k": 4, "expert_hidden": 16},
    "data": {"seq_len": 32},
    "train": {"steps": 50, "batch_size": 4, "lr": 3e-3, "min_lr": 3e-4, "warmup_steps": 1,
              "eval_every": 0, "eval_batches": 1, "save_every": 0, "threads": 1},
}  # fmt: skip


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """A 3-step run trained through the CLI (shared by the generate tests)."""
    folder = tmp_path_factory.mktemp("cli")
    config = folder / "tiny.yaml"
    config.write_text(yaml.safe_dump(TINY))
    n = torch.get_num_threads()
    code = main(
        ["train", str(config), "train.steps=3", "moe.router=global", f"train.out_dir={folder / 'run'}"]
    )
    torch.set_num_threads(n)
    assert code == 0
    return folder / "run"


def assert_one_error_line(capsys, code: int, *fragments: str) -> None:
    err = capsys.readouterr().err
    lines = err.splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    for fragment in fragments:
        assert fragment in lines[0], (fragment, err)


def test_params_of_pangu_pro_moe(capsys):
    assert main(["params", str(ROOT / "configs" / "pangu-pro-moe-72b.yaml")]) == 0
    out = capsys.readouterr().out
    assert "71.99B" in out and "16.50B" in out


def test_params_applies_overrides(capsys):
    main(["params", str(ROOT / "configs" / "tiny-moge.yaml")])
    base = capsys.readouterr().out
    main(["params", str(ROOT / "configs" / "tiny-moge.yaml"), "moe.num_experts=32"])
    assert capsys.readouterr().out != base


def test_train_with_overrides_writes_the_run(trained_run, capsys):
    cfg = yaml.safe_load((trained_run / "config.yaml").read_text())
    assert cfg["train"]["steps"] == 3 and cfg["moe"]["router"] == "global"
    assert (trained_run / "checkpoints" / "step_00000003" / "state.json").exists()


def test_generate_prints_prompt_and_sample(trained_run, capsys):
    args = ["generate", str(trained_run), "--prompt", "Hello", "--tokens", "12", "--seed", "3"]
    assert main(args) == 0
    out = capsys.readouterr().out.rstrip("\n")
    assert out.startswith("Hello") and len(out) > len("Hello")
    main(args)
    assert capsys.readouterr().out.rstrip("\n") == out, "a fixed --seed repeats the sample"


def test_generate_too_long_is_a_user_error(trained_run, capsys):
    code = main(["generate", str(trained_run), "--prompt", "Hi", "--tokens", "100"])
    assert_one_error_line(capsys, code, "--tokens", "max_seq_len=64")


def test_generate_with_a_prompt_too_long_names_the_prompt(trained_run, capsys):
    # 70 bytes > max_seq_len 64: no --tokens fits (it said "at most 0 new tokens fit").
    code = main(["generate", str(trained_run), "--prompt", "x" * 70, "--tokens", "0"])
    assert_one_error_line(capsys, code, "--prompt: 70 bytes", "max_seq_len=64", "shorten it by 6 bytes")
    assert main(["generate", str(trained_run), "--prompt", "x" * 64, "--tokens", "0"]) == 0
    assert capsys.readouterr().out == "x" * 64 + "\n"


def test_generate_stops_after_the_stop_token(trained_run, capsys):
    base = ["generate", str(trained_run), "--prompt", "Hello", "--tokens", "20", "--temperature", "0"]
    assert main(base) == 0
    sample = capsys.readouterr().out[:-1]  # print's newline
    new = sample[len("Hello") :]
    stop = next(c for c in new if c.isascii())  # one byte: its id is its code
    assert main([*base, "--stop-token", str(ord(stop))]) == 0
    assert capsys.readouterr().out[:-1] == sample[: len("Hello") + new.index(stop) + 1]
    code = main([*base, "--stop-token", "256"])
    assert_one_error_line(capsys, code, "--stop-token: 256", "vocab_size=256")


def _generate_out(capsys, *argv: str) -> str:
    assert main(["generate", *argv]) == 0
    return capsys.readouterr().out


@pytest.mark.parametrize("stop", [None, "105"])
def test_generate_several_prompts_print_what_each_gets_alone(trained_run, capsys, stop):
    # Of different lengths (left-padded); with --stop-token 105 ("i") this run's greedy
    # rows stop at different steps ("Hello" -> "Hello i", "Hi " -> "Hi i"), and the rows
    # that stopped first must not print the repeats generate pads them with.
    prompts = ["Hello", "Hi ", "The with statement", "e"]
    base = [str(trained_run), "--tokens", "16", "--temperature", "0"]
    base += [] if stop is None else ["--stop-token", stop]
    batch = _generate_out(capsys, *base, *(a for p in prompts for a in ("--prompt", p)))
    alone = [_generate_out(capsys, *base, "--prompt", p) for p in prompts]
    assert batch == "".join(alone)  # in order, one print each
    for p, out in zip(prompts, alone):
        assert out.startswith(p) and len(out) > len(p) + 1
    if stop is not None:  # the rows did stop at different steps (else the test proves little)
        assert len({len(out) - len(p) for p, out in zip(prompts, alone)}) > 1, alone


def test_generate_top_p(trained_run, capsys):
    base = [str(trained_run), "--prompt", "Hello", "--tokens", "12", "--seed", "3"]
    nucleus = _generate_out(capsys, *base, "--top-p", "0.5")
    assert _generate_out(capsys, *base, "--top-p", "0.5") == nucleus, "a fixed --seed repeats the sample"
    assert _generate_out(capsys, *base, "--top-p", "1") == _generate_out(capsys, *base)  # 1: off
    # a nucleus below the likeliest byte's probability: greedy
    greedy = _generate_out(capsys, *base, "--temperature", "0")
    assert _generate_out(capsys, *base, "--top-p", "1e-9") == greedy


@pytest.mark.parametrize(
    "args, fragments",
    [
        (["--prompt", "Hi", "--top-p", "0"], ["argument --top-p: expected a number in (0, 1]"]),
        (["--prompt", "Hi", "--top-p", "1.5"], ["--top-p", "(0, 1]"]),
        (["--prompt", "Hi", "--top-p", "nan"], ["--top-p", "(0, 1]"]),
        (["--prompt", "Hi", "--temperature", "-1"], ["argument --temperature: expected a number >= 0"]),
        (["--prompt", "Hi", "--prompt", ""], ["--prompt #2: must not be empty"]),
        (["--prompt", "Hi", "--prompt", "x" * 70], ["--prompt #2: 70 bytes", "shorten it by 6 bytes"]),
        (
            ["--prompt", "Hi", "--prompt", "x" * 50, "--tokens", "20"],
            ["--tokens: the longest prompt (#2) (50 bytes)", "at most 14 new tokens fit"],
        ),
    ],
)
def test_generate_bad_prompts_and_sampling_settings_are_user_errors(trained_run, capsys, args, fragments):
    assert_one_error_line(capsys, main(["generate", str(trained_run), *args]), *fragments)


# Every flag with a type= of its own: (argv up to the flag, flag, what its error expects).
# Parsing fails at the flag, so the paths need not exist.
NUMBER_FLAGS = [
    (["eval", "r"], "--batches", "an integer >= 1"),
    (["eval", "r"], "--knockout", "an integer >= 1"),
    (["generate", "r", "--prompt", "a"], "--tokens", "an integer >= 0"),
    (["generate", "r", "--prompt", "a"], "--temperature", "a number >= 0 (0: greedy)"),
    (["generate", "r", "--prompt", "a"], "--top-k", "an integer >= 1"),
    (["generate", "r", "--prompt", "a"], "--top-p", "a number in (0, 1] (1: off)"),
    (["generate", "r", "--prompt", "a"], "--seed", "an integer in 0..2**63-1"),
    (["generate", "r", "--prompt", "a"], "--stop-token", "an integer >= 0"),
    (["simulate", "c"], "--devices", "an integer >= 1"),
    (["simulate", "c"], "--tokens", "an integer >= 1"),
    (["simulate", "c"], "--trials", "an integer >= 1"),
    (["simulate", "c"], "--tflops", "a number"),
    (["simulate", "c"], "--bandwidth-gbs", "a number"),
    (["simulate", "c"], "--seed", "an integer in 0..2**63-1"),
    (["simulate", "c"], "--sigma", "a number"),
    (["plan", "c"], "--devices", "an integer >= 1"),
    (["plan", "c"], "--micro-batch", "an integer >= 1"),
    (["plan", "c"], "--device-gb", "a number"),
    (["fingerprint", "m"], "--permutations", "an integer >= 0"),
    (["fingerprint", "m"], "--bootstrap", "an integer >= 0"),
    (["fingerprint", "m"], "--seed", "an integer in 0..2**63-1"),
    (["convert", "s", "d", "--to", "moge"], "--max-shard-bytes", "an integer >= 1"),
    (["upcycle", "s", "d", "--config", "c"], "--seed", "an integer >= 0"),
]


@pytest.mark.parametrize(
    "argv, flag, expected", NUMBER_FLAGS, ids=lambda v: v if isinstance(v, str) else None
)
def test_a_bad_number_names_the_flag_and_what_it_takes(cli_error, argv, flag, expected):
    """Not argparse's "invalid _top_p value: 'abc'" (the type function's name)."""
    line = cli_error([*argv, flag, "abc"])
    assert line.startswith(f"error: argument {flag}: expected {expected}, got 'abc' (see `moge "), line
    # Out of range (or, for a plain number, no number) reads the same.
    bad = "1.5" if "integer" in expected else "x" if expected == "a number" else "-1"
    assert f"argument {flag}: expected {expected}, got {bad!r}" in cli_error([*argv, flag, bad])


def _typed_actions():
    """(subcommand, action) of every option whose type= moge._argtypes.arg_type built."""
    subs = next(a for a in build_parser()._actions if a.dest == "command").choices
    for name, parser in subs.items():
        for action in parser._actions:
            if callable(action.type) and getattr(action.type, "__module__", None) == "moge._argtypes":
                yield name, action


def test_the_table_above_covers_every_number_flag():
    """A flag added later with its own type= gets a row (and so a tested message)."""
    covered = {(argv[0], flag) for argv, flag, _ in NUMBER_FLAGS}
    assert {(name, action.option_strings[-1]) for name, action in _typed_actions()} == covered


def test_a_long_bad_number_is_cut_in_the_message(cli_error):
    line = cli_error(["generate", "r", "--prompt", "a", "--seed", "9" * 100])
    assert f"got {'9' * 40!r}... (see" in line


def test_eval_calls_evaluate(monkeypatch):
    calls = []
    fake = types.ModuleType("moge.tools.evaluate")
    fake.eval_command = lambda run_dirs, batches=None, out=None, knockout=None: calls.append(
        (run_dirs, batches, out, knockout)
    )
    monkeypatch.setitem(sys.modules, "moge.tools.evaluate", fake)
    assert main(["eval", "runs/a", "runs/b", "--batches", "4", "--out", "cmp"]) == 0
    assert main(["eval", "runs/a", "--knockout"]) == 0
    assert main(["eval", "runs/a", "--knockout", "2"]) == 0
    assert calls == [
        (["runs/a", "runs/b"], 4, "cmp", None),
        (["runs/a"], None, None, 4),
        (["runs/a"], None, None, 2),
    ]


@pytest.mark.parametrize(
    "argv, fragments",
    [
        (["params", "missing.yaml"], ["config file not found: missing.yaml"]),
        (["params", "{tiny}", "train.stepz=3"], ["train.stepz: unknown key"]),
        (["params", "{tiny}", "model.d_model=abc"], ["model.d_model: expected an integer"]),
        (["params", "{bad_yaml}"], ["not valid YAML"]),
        (["train", "{tiny}", "data.path={tmp}/nope.txt"], ["data.path", "does not exist"]),
        (["generate", "{tmp}/no-run", "--prompt", "x"], ["no-run", "no such run"]),
        (["params"], ["the following arguments are required: config"]),
        (["generate", "{tmp}", "--tokens", "-1", "--prompt", "x"], ["--tokens"]),
    ],
)
def test_user_errors_print_one_line_and_exit_2(tmp_path, capsys, argv, fragments):
    tiny, bad_yaml = tmp_path / "tiny.yaml", tmp_path / "bad.yaml"
    tiny.write_text(yaml.safe_dump(TINY))
    bad_yaml.write_text("model: [unclosed\n  d_model: 3\n")
    fill = {"tiny": str(tiny), "bad_yaml": str(bad_yaml), "tmp": str(tmp_path)}
    code = main([a.format(**fill) for a in argv])
    assert_one_error_line(capsys, code, *(f.format(**fill) for f in fragments))


def test_interrupt_and_divergence_exit_codes(tmp_path, capsys, monkeypatch):
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(TINY))

    def interrupted(cfg, progress=True):
        raise KeyboardInterrupt

    def diverged(cfg, progress=True):
        raise moge.training.NonFiniteLossError(
            "step 7: the loss is nan at layer 0 (MoE): non-finite router scores"
        )

    monkeypatch.setattr(moge.training, "train", interrupted)
    assert main(["train", str(config)]) == 130
    assert len(capsys.readouterr().err.splitlines()) == 1
    monkeypatch.setattr(moge.training, "train", diverged)
    assert main(["train", str(config)]) == 1
    assert capsys.readouterr().err.strip() == (
        "error: step 7: the loss is nan at layer 0 (MoE): non-finite router scores"
    )


def test_python_dash_m_moge(monkeypatch, capsys):
    # In-process (runpy) rather than a subprocess: the same __main__ code, without a
    # second torch import.
    monkeypatch.setattr(sys, "argv", ["moge", "params", str(ROOT / "configs" / "tiny-moge.yaml")])
    with pytest.raises(SystemExit) as exit_:
        runpy.run_module("moge", run_name="__main__")
    assert exit_.value.code == 0 and "activated" in capsys.readouterr().out
