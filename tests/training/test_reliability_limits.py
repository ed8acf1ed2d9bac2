"""Reliability of inputs at their limits: YAML that is hostile, sizes that cannot exist,
odd command-line values, I/O errors, dtypes at the library's edge.

CLI cases go through `moge.cli.main` and must end in one `error: ...` line, exit 2, no
traceback (the `cli_error` fixture). docs/reliability.md ("Limits") points here.
"""

from __future__ import annotations

import copy
import dataclasses
import errno
import os
import re
import stat
from pathlib import Path

import pytest
import torch
import yaml

import moge.training.corpus as data_mod
import moge.training.limits as limits
from moge.layer import MoGEConfig, MoGELayer
from moge.routing import random_routed
from moge.training.config import SECTIONS, config_from_dict, load_config

pytestmark = pytest.mark.usefixtures("one_thread")

BASE = {
    "name": "lim",
    "model": {"d_model": 32, "n_layers": 1, "n_heads": 4, "n_kv_heads": 2, "max_seq_len": 16},
    "moe": {"num_experts": 4, "num_groups": 2, "top_k": 2, "expert_hidden": 16},
    "data": {"seq_len": 16},
    "train": {"steps": 2, "batch_size": 2, "warmup_steps": 1, "log_every": 100, "eval_every": 0,
              "eval_batches": 1, "save_every": 0, "keep_last": 1, "threads": 1},
}  # fmt: skip

BASE_TEXT = yaml.safe_dump(BASE, sort_keys=False)


@pytest.fixture
def no_training(monkeypatch):
    import moge.training as train_mod

    def refuse(cfg, progress=True, stop_at=None):
        raise AssertionError("the CLI accepted a config it should refuse")

    monkeypatch.setattr(train_mod, "train", refuse)


def write(tmp_path: Path, text: str | bytes, name: str = "run.yaml") -> Path:
    path = tmp_path / name
    path.write_bytes(text.encode() if isinstance(text, str) else text)
    return path


# ============================================================================ YAML: duplicate keys

DUPLICATES = {
    "second_model_section": (BASE_TEXT + "model:\n  d_model: 64\n", "duplicate key 'model'"),
    "key_repeated_in_section": (
        BASE_TEXT.replace("  d_model: 32\n", "  d_model: 32\n  d_model: 64\n", 1),
        "duplicate key 'd_model'",
    ),
    "key_repeated_in_train": (
        BASE_TEXT.replace("  steps: 2\n", "  steps: 2\n  steps: 3\n"),
        "duplicate key 'steps'",
    ),
    "name_twice": (BASE_TEXT + "name: other\n", "duplicate key 'name'"),
    "flow_mapping": (BASE_TEXT + "eval: {batches: 1, batches: 2}\n", "duplicate key 'batches'"),
    "same_value_twice": (
        BASE_TEXT.replace("  steps: 2\n", "  steps: 2\n  steps: 2\n"),
        "duplicate key 'steps'",
    ),
    "quoted_and_plain": (BASE_TEXT + "'model':\n  d_model: 64\n", "duplicate key 'model'"),
}


def test_keys_equal_once_parsed_are_duplicates():
    from moge.training.safeyaml import loads

    cases = (("true: 1\nTrue: 2\n", "'True'"), ("16: a\n0x10: b\n", "'0x10'"), ("1: a\ntrue: b\n", "'true'"))
    for text, key in cases:
        with pytest.raises(ValueError, match=rf"line 2: duplicate key {key} \(first on line 1\)"):
            loads(text, "t.yaml")
    assert loads("a: &x {k: 1}\nb:\n  <<: *x\n  j: 2\n", "t.yaml") == {"a": {"k": 1}, "b": {"k": 1, "j": 2}}


@pytest.mark.parametrize(
    "text, fragment",
    [
        ("seed: 0042\n", "line 1: 0042 is octal in YAML 1.1 (34) but 42 in YAML 1.2"),
        ("a: 1\nsteps: -010\n", "line 2: -010 is octal in YAML 1.1 (-8) but -10 in YAML 1.2"),
        ("steps: 1:30\n", "line 1: 1:30 is a base-60 number in YAML 1.1 (90)"),
    ],
)
def test_integers_yaml_versions_read_differently_are_refused_naming_the_line(text, fragment):
    """PyYAML reads YAML 1.1, where a leading zero means octal and a colon base 60: a
    researcher's `seed: 0042` would silently become 34. Refused; the readings that agree
    (0, 07, 0x10, 1_000) stay."""
    from moge.training.safeyaml import loads

    with pytest.raises(ValueError, match=re.escape(f"t.yaml: not valid YAML: {fragment}")):
        loads(text, "t.yaml")
    assert loads("a: 0\nb: 07\nc: 0x10\nd: 1_000\ne: -3\nf: 00\n", "t.yaml") == dict(
        a=0, b=7, c=16, d=1000, e=-3, f=0
    )
    with pytest.raises(ValueError, match="octal in YAML 1.1"):
        load_config("tiny-moge", ["train.seed=0042"])


@pytest.mark.parametrize("kind", list(DUPLICATES))
@pytest.mark.parametrize("command", ["train", "params"])
def test_duplicate_yaml_keys_are_refused_naming_the_line(tmp_path, cli_error, no_training, kind, command):
    text, fragment = DUPLICATES[kind]
    path = write(tmp_path, text)
    line = cli_error([command, str(path)])
    assert fragment in line and str(path) in line, line
    key = fragment.split("'")[1]
    pattern = re.compile(rf"(^|[{{,]\s*)'?{key}'?:")
    where = [i + 1 for i, t in enumerate(text.splitlines()) if pattern.search(t.strip())]
    assert f"line {where[-1]}: duplicate key '{key}' (first on line {where[0]})" in line, (line, where)


def test_merge_keys_and_anchors_still_work(tmp_path):
    anchored = BASE_TEXT.replace("data:", "eval: &ev {batches: 3}\ndata:")
    assert load_config(write(tmp_path, anchored)).eval.batches == 3
    merged = BASE_TEXT + "eval:\n  <<: {batches: 5}\n  plots: false\n"
    cfg = load_config(write(tmp_path, merged, "m.yaml"))
    assert cfg.eval.batches == 5 and cfg.eval.plots is False


# ============================================================================ YAML: size, depth, aliases


def _alias_bomb(levels: int = 9) -> str:
    lines = ['a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    for i in range(1, levels):
        prev, cur = chr(ord("a") + i - 1), chr(ord("a") + i)
        lines.append(f"{cur}: &{cur} [{','.join(['*' + prev] * 9)}]")
    return "\n".join(lines) + "\n"


HOSTILE = {
    "alias_bomb": (lambda: _alias_bomb(), "more than 100,000 values once its aliases are expanded"),
    "alias_bomb_in_a_section": (
        lambda: BASE_TEXT + "eval:\n  " + _alias_bomb().replace("\n", "\n  ").replace("a: &a", "z: &a"),
        "more than 100,000 values once its aliases are expanded",
    ),
    "recursive_alias": (lambda: "model: &m\n  d_model: *m\n", "refers to a value that contains it"),
    "deep_lists": (lambda: "model: " + "[" * 60 + "]" * 60 + "\n", "nested deeper than 32 levels"),
    "very_deep_lists": (lambda: "model: " + "[" * 50000 + "]" * 50000 + "\n", "nested deeper than 32 levels"),
    "deep_mappings": (lambda: "".join("  " * i + f"k{i}:\n" for i in range(40)), "nested deeper than 32"),
    "huge_file": (lambda: BASE_TEXT + "#" * (2 << 20) + "\n", "larger than 1,048,576 bytes"),
    "int_of_5000_digits": (
        lambda: BASE_TEXT.replace("steps: 2", "steps: " + "9" * 5000),
        "a value cannot be read",
    ),
    "not_utf8": (lambda: BASE_TEXT.encode() + b"# \xff\xfe\n", "not UTF-8"),
    "nul_in_out_dir": (
        lambda: BASE_TEXT.replace("train:", 'train:\n  out_dir: "runs/a\\0b"'),
        "contains a NUL",
    ),
    "nul_in_data_path": (
        lambda: BASE_TEXT.replace("data:", 'data:\n  path: "a\\0.txt"'),
        "data.path: contains a NUL",
    ),
    "nul_in_name": (
        lambda: BASE_TEXT.replace("name: lim", 'name: "l\\0m"'),
        "name: expected a non-empty string",
    ),
    "long_bad_value": (
        lambda: BASE_TEXT.replace("steps: 2", "steps: " + "x" * 100000),
        "train.steps: expected",
    ),
    "long_unknown_key": (
        lambda: BASE_TEXT.replace("steps: 2", "steps: 2\n  " + "k" * 1000 + ": 1"),
        "unknown key",
    ),
    "big_list_value": (
        lambda: BASE_TEXT.replace("steps: 2", "steps: [" + "1," * 5000 + "1]"),
        "expected an int",
    ),
}


@pytest.mark.parametrize("kind", list(HOSTILE))
def test_hostile_yaml_is_one_short_error_line(tmp_path, cli_error, no_training, kind):
    make, fragment = HOSTILE[kind]
    path = write(tmp_path, make())
    line = cli_error(["train", str(path)])
    assert fragment in line and len(line) < 700, line[:1000]


def test_the_alias_bomb_is_small_and_its_error_is_fast(tmp_path):
    import time

    text = _alias_bomb()  # 9**9 = 387 million strings once expanded
    assert len(text.encode()) < 500
    t0 = time.perf_counter()
    with pytest.raises(ValueError, match="more than 100,000 values once its aliases are expanded"):
        load_config(write(tmp_path, text))
    assert time.perf_counter() - t0 < 5, "refused from the node graph, never expanded"


@pytest.mark.parametrize("kind", ["dev_zero", "dev_null", "fifo", "socket_like_dir"])
def test_config_path_that_is_not_a_regular_file_is_refused(tmp_path, cli_error, kind):
    if kind == "dev_zero":
        path = "/dev/zero"
    elif kind == "dev_null":
        path = "/dev/null"
    elif kind == "fifo":
        path = str(tmp_path / "fifo.yaml")
        os.mkfifo(path)  # opening it would block until a writer comes: it is never opened
    else:
        path = str(tmp_path)
    if not os.path.exists(path):
        pytest.skip(f"{path} does not exist here")
    line = cli_error(["params", path])
    expected = "is a folder" if kind == "socket_like_dir" else "not a regular file"
    assert expected in line and path in line, line
    if kind == "fifo":
        assert stat.S_ISFIFO(os.stat(path).st_mode)


@pytest.mark.parametrize(
    "override, fragment",
    [
        (
            "train.steps=[" + ",".join(["1"] * 10000) + "]",
            "train.steps: expected an integer, got [1, 1, 1, 1, 1, 1, ...]",
        ),
        ("train.out_dir=" + "x\\0", None),
        ("eval.batches=&a [*a]", "refers to a value that contains it"),
        ("model.d_model=" + "[" * 100 + "]" * 100, "nested deeper than 32"),
        ("model.d_model=" + "9" * 5000, "a value cannot be read"),
    ],
)
def test_hostile_override_values_are_one_short_line(tmp_path, cli_error, no_training, override, fragment):
    path = write(tmp_path, BASE_TEXT)
    if fragment is None:  # a NUL cannot be in argv; YAML's "\0" escape puts one in the value
        override, fragment = 'train.out_dir="a\\0b"', "train.out_dir: contains a NUL byte"
    line = cli_error(["train", str(path), override])
    assert fragment in line and len(line) < 700, line[:1000]


# ============================================================================ int64 limits, every int field


def _int_fields() -> list[tuple[str, str]]:
    out = []
    for section, cls in SECTIONS.items():
        for f in dataclasses.fields(cls):
            if f.type in ("int", "int | None", "Optional[int]") and not (
                section == "moe" and f.name == "d_model"
            ):
                out.append((section, f.name))
    return out


INT_FIELDS = _int_fields()


def test_the_int_field_list_covers_the_known_sizes():
    names = {f"{s}.{n}" for s, n in INT_FIELDS}
    for field in (
        "model.max_seq_len",
        "train.batch_size",
        "moe.expert_hidden",
        "data.seed",
        "eval.batch_size",
    ):
        assert field in names
    assert len(names) >= 30


@pytest.mark.parametrize("section, name", INT_FIELDS)
def test_every_int_field_beyond_int64_is_refused_naming_it(section, name):
    raw = copy.deepcopy(BASE)
    raw.setdefault(section, {})[name] = 10**30
    with pytest.raises(
        ValueError, match=rf"{section}\.{name}: must be <= 2\*\*63 - 1, the int64 limit"
    ) as err:
        config_from_dict(raw)
    assert len(str(err.value)) < 300


# ============================================================================ sizes that cannot fit


@pytest.mark.parametrize(
    "override, part",
    [
        (f"model.max_seq_len={10**12}", "RoPE tables"),
        (f"train.batch_size={10**15}", "one batch of logits"),
        (f"moe.expert_hidden={10**12}", "weights, gradients and AdamW moments"),
        (f"model.vocab_size={10**13}", "weights, gradients and AdamW moments"),
    ],
)
def test_train_refuses_sizes_this_machine_cannot_hold(tmp_path, cli_error, override, part):
    path = write(tmp_path, BASE_TEXT)
    out = tmp_path / "run"
    line = cli_error(["train", str(path), override, f"train.out_dir={out}"])
    assert (
        line.startswith("error: config lim: needs at least ") and part in line and "is available" in line
    ), line
    assert not out.exists(), "nothing was written"


def test_train_memory_estimate_is_a_lower_bound_of_a_real_model():
    cfg = config_from_dict(BASE)
    from moge.model import MoGETransformer

    model = MoGETransformer(cfg.model, cfg.moe)
    weights = sum(t.numel() * t.element_size() for t in model.parameters())
    rope = sum(b.numel() * b.element_size() for n, b in model.named_buffers() if "cos" in n or "sin" in n)
    parts = limits.train_memory(cfg)
    assert parts["weights, gradients and AdamW moments"] == 4 * weights
    assert parts["RoPE tables"] == rope


def test_check_train_fits_uses_the_available_memory():
    cfg = config_from_dict(BASE)
    needed = sum(limits.train_memory(cfg).values())
    limits.check_train_fits(cfg, available=needed)
    with pytest.raises(limits.TooLargeError, match="needs at least .* but .* is available"):
        limits.check_train_fits(cfg, available=needed - 1)


def test_check_train_fits_counts_one_rank_share_of_the_model_under_several_processes():
    cfg = config_from_dict(BASE)
    key = "weights, gradients and AdamW moments"
    whole, two = limits.train_memory(cfg), limits.train_memory(cfg, processes=2)
    assert two[key] == whole[key] // 2 and {k: v for k, v in two.items() if k != key} == {
        k: v for k, v in whole.items() if k != key
    }
    needed = sum(two.values())
    limits.check_train_fits(cfg, available=needed, processes=2)  # each rank holds half the model
    with pytest.raises(limits.TooLargeError, match="needs at least"):
        limits.check_train_fits(cfg, available=needed, processes=1)


def test_the_72b_preset_on_64_devices_is_not_refused_for_the_whole_model():
    # moge plan: rank 0 of 64 (dp 8 x ep 8) needs about 35 GiB of an 80 GiB device
    cfg = load_config("pangu-pro-moe-72b", ["parallel.expert_parallel=8", "train.batch_size=1"])
    limits.check_train_fits(cfg, available=80 * limits.GIB, processes=64)
    with pytest.raises(limits.TooLargeError, match="needs at least 1.0 TiB"):
        limits.check_train_fits(cfg, available=80 * limits.GIB, processes=1)


def test_available_memory_is_known_here():
    assert limits.available_memory() is None or limits.available_memory() > 0


@pytest.mark.parametrize("suffix", [".bin", ".txt"])
def test_sparse_64_gib_corpus_is_refused_before_reading(tmp_path, cli_error, monkeypatch, suffix):
    big = tmp_path / f"big{suffix}"
    with open(big, "wb") as f:
        f.truncate(64 << 30)  # sparse: no disk space used
    monkeypatch.setattr(data_mod, "available_memory", lambda: 8 << 30)
    path = write(tmp_path, BASE_TEXT)
    line = cli_error(["train", str(path), f"data.path={big}", f"train.out_dir={tmp_path / 'run'}"])
    assert line.startswith(f"error: data.path: {big}: needs at least ") and "8.0 GiB is available" in line, (
        line
    )


@pytest.mark.parametrize("tokens", [10**12, 10**18, 10**30])
def test_simulate_refuses_token_counts_that_cannot_fit(tmp_path, cli_error, tokens):
    path = write(tmp_path, BASE_TEXT)
    line = cli_error(["simulate", str(path), "--devices", "2", "--tokens", str(tokens), "--trials", "1"])
    assert line.startswith(f"error: --tokens {tokens} x --trials 1: needs at least "), line


# ============================================================================ data I/O errors


def test_io_error_reading_a_text_corpus_names_the_file(tmp_path, cli_error, monkeypatch):
    corpus = write(tmp_path, "hello world " * 500, "corpus.txt")
    real = Path.read_bytes

    def failing(self):
        if self == corpus:
            raise OSError(errno.EIO, "Input/output error")
        return real(self)

    monkeypatch.setattr(Path, "read_bytes", failing)
    path = write(tmp_path, BASE_TEXT)
    line = cli_error(["train", str(path), f"data.path={corpus}", f"train.out_dir={tmp_path / 'run'}"])
    assert line == f"error: data.path: reading {corpus} failed: Input/output error", line


def test_io_error_in_a_folder_corpus_names_the_file(tmp_path, monkeypatch):
    folder = tmp_path / "docs"
    folder.mkdir()
    (folder / "a.txt").write_text("a" * 5000)
    (folder / "b.txt").write_text("b" * 5000)
    real = Path.read_bytes
    monkeypatch.setattr(
        Path,
        "read_bytes",
        lambda p: (_ for _ in ()).throw(OSError(errno.EIO, "x")) if p.name == "b.txt" else real(p),
    )
    with pytest.raises(OSError, match=r"data.path: reading .*b\.txt failed"):
        data_mod.load_corpus(config_from_dict({**BASE, "data": {"seq_len": 16, "path": str(folder)}}).data)


def test_io_error_reading_a_bin_corpus_names_the_file(tmp_path, monkeypatch):
    corpus = tmp_path / "c.bin"
    corpus.write_bytes(b"\x01\x00" * 5000)

    def failing(*args, **kwargs):
        raise RuntimeError("read failed: Input/output error\nmore detail")

    monkeypatch.setattr(data_mod.torch, "from_file", failing)
    with pytest.raises(
        OSError, match=r"data.path: reading .*c\.bin failed: read failed: Input/output error$"
    ):
        data_mod.load_corpus(config_from_dict({**BASE, "data": {"seq_len": 16, "path": str(corpus)}}).data)


# ============================================================================ trace files


@pytest.mark.parametrize("kind", ["text", "empty", "pickle", "truncated", "float_ids", "bad_layer_name"])
def test_trace_that_is_not_a_safetensors_trace_is_one_error_line(tmp_path, cli_error, kind):
    from safetensors.torch import save_file

    trace = tmp_path / "trace.safetensors"
    ids = torch.randint(0, 4, (64, 2))
    if kind == "text":
        trace.write_text("layer_0: [1, 2]\n")
    elif kind == "empty":
        trace.write_bytes(b"")
    elif kind == "pickle":
        torch.save({"layer_0": ids}, trace)
    elif kind == "truncated":
        save_file({"layer_0": ids}, str(trace))
        trace.write_bytes(trace.read_bytes()[:-100])
    elif kind == "float_ids":
        save_file({"layer_0": ids.float() + 0.5}, str(trace))
    else:
        save_file({"layer_x": ids}, str(trace))
    path = write(tmp_path, BASE_TEXT)
    argv = ["simulate", str(path), "--devices", "2", "--tokens", "16", "--trials", "1", "--trace", str(trace)]
    line = cli_error(argv + ["--out", str(tmp_path / "out")])
    expected = {"float_ids": "holds torch.float32 values, not integer expert ids",
                "bad_layer_name": "holds no layer_<i> tensors"}.get(kind, "is not a readable safetensors file")  # fmt: skip
    assert line.startswith("error: --trace: ") and expected in line, line


# ============================================================================ generate


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> Path:
    import moge.training as train_mod

    run = tmp_path_factory.mktemp("gen") / "run"
    raw = copy.deepcopy(BASE)
    raw["train"]["out_dir"] = str(run)
    train_mod.train(config_from_dict(raw), progress=False)
    return run


@pytest.mark.parametrize("temperature", ["1e-45", "5e-324", "1e-30"])
def test_tiny_temperatures_sample_like_greedy(tiny_run, capsys, temperature):
    from moge.cli import main

    outs = []
    for t in ("0", temperature):
        assert main(["generate", str(tiny_run), "--prompt", "The ", "--tokens", "8", "--temperature", t]) == 0
        outs.append(capsys.readouterr().out)
    assert outs[0] == outs[1]


def test_huge_temperature_samples_without_nan(tiny_run, capsys):
    from moge.cli import main

    assert main(["generate", str(tiny_run), "--prompt", "a", "--tokens", "4", "--temperature", "1e300"]) == 0


@pytest.mark.parametrize(
    "argv, fragment",
    [
        (["--prompt", "caf\udce9"], "--prompt: not valid UTF-8 text"),
        (["--prompt", "\udcff\udcfe"], "--prompt: not valid UTF-8 text"),
        (["--prompt", "a", "--temperature", "nan"], "--temperature: expected a number >= 0"),
        (["--prompt", "a", "--temperature=-1e-45"], "--temperature: expected a number >= 0"),
    ],
)
def test_bad_generate_inputs_are_one_error_line(tiny_run, cli_error, argv, fragment):
    line = cli_error(["generate", str(tiny_run), "--tokens", "2", *argv])
    assert fragment in line, line


# ============================================================================ the library's edge


def _layer(**kw) -> MoGELayer:
    torch.manual_seed(0)
    return MoGELayer(MoGEConfig(d_model=16, num_experts=8, num_groups=4, top_k=4, expert_hidden=8, **kw))


@pytest.mark.parametrize("shared", [0, 1])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_input_dtype_other_than_the_layers_is_a_clear_error(dtype, shared):
    layer = _layer(num_shared_experts=shared)
    with pytest.raises(
        ValueError, match=rf"x: dtype {dtype} (is wider than|differs from) the layer's parameters"
    ):
        layer(torch.randn(3, 16, dtype=dtype))


def test_bf16_input_under_autocast_is_still_fine():
    layer = _layer(num_shared_experts=1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(torch.randn(3, 16).bfloat16())
    assert out.hidden.dtype == torch.bfloat16 and bool(torch.isfinite(out.hidden.float()).all())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bool, torch.complex64])
def test_random_router_refuses_non_integer_token_ids(dtype):
    table = torch.randint(0, 8, (16, 4))
    ids = torch.tensor([1, 2, 3]).to(dtype)
    with pytest.raises(ValueError, match=rf"token_ids: expected integer ids, got {dtype}"):
        random_routed(torch.rand(3, 8), ids, table)
    layer = _layer(router="random", rre_vocab_size=16)
    with pytest.raises(ValueError, match="token_ids: expected integer ids"):
        layer(torch.randn(3, 16), token_ids=torch.tensor([1.7, 2.2, 3.9]))


@pytest.mark.parametrize("dtype", [torch.int32, torch.int64, torch.uint8, torch.int16])
def test_random_router_takes_any_integer_ids_alike(dtype):
    table = torch.randint(0, 8, (16, 4), generator=torch.Generator().manual_seed(0))
    scores = torch.rand(3, 8, generator=torch.Generator().manual_seed(1))
    w, ids = random_routed(scores, torch.tensor([1, 2, 3]).to(dtype), table)
    w64, ids64 = random_routed(scores, torch.tensor([1, 2, 3]), table)
    torch.testing.assert_close(ids, ids64, rtol=0, atol=0)
    torch.testing.assert_close(w, w64, rtol=0, atol=0)


@pytest.mark.parametrize("seed", [str(10**30), "-5", str(2**63)])
@pytest.mark.parametrize("command", ["generate", "simulate"])
def test_seed_flags_outside_int64_are_one_error_line(tiny_run, tmp_path, cli_error, seed, command):
    if command == "generate":
        argv = ["generate", str(tiny_run), "--prompt", "a", "--tokens", "1", "--seed", seed]
    else:
        argv = [
            "simulate",
            str(write(tmp_path, BASE_TEXT)),
            "--devices",
            "2",
            "--tokens",
            "16",
            "--seed",
            seed,
        ]
    line = cli_error(argv)
    assert "argument --seed: expected an integer in 0..2**63-1" in line, line


def test_train_threads_beyond_a_sane_count_is_refused():
    raw = copy.deepcopy(BASE)
    raw["train"]["threads"] = 10**6  # torch would try to start a million OS threads
    with pytest.raises(ValueError, match=r"train.threads: must be <= 1024, got 1000000"):
        config_from_dict(raw)


@pytest.mark.parametrize(
    "edits",
    [
        {},
        {"moe.router": "random"},
        {"model.n_layers": 5, "model.first_dense_layers": 2, "model.moe_every": 2},
        {"model.n_layers": 7, "model.first_dense_layers": 1, "model.moe_every": 3, "moe.router": "random",
         "moe.num_shared_experts": 1},
        {"model.n_layers": 3, "model.first_dense_layers": 5},
        {"model.n_layers": 4, "model.tie_embeddings": True, "moe.learned_expert_scale": True},
    ],
)  # fmt: skip
def test_closed_form_parameter_count_matches_building_the_model(edits):
    from moge.model import count_parameters

    raw = copy.deepcopy(BASE)
    for dotted, value in edits.items():
        section, key = dotted.split(".")
        raw[section][key] = value
    cfg = config_from_dict(raw)
    assert limits.parameter_count(cfg.model, cfg.moe) == count_parameters(cfg.model, cfg.moe)


def test_moge_params_counts_any_depth_at_once(tmp_path, capsys):
    import time

    from moge.cli import main

    path = write(tmp_path, BASE_TEXT)
    t0 = time.perf_counter()
    args = [
        "params",
        str(path),
        "model.n_layers=1000000000",
        "moe.router=random",
        f"model.vocab_size={10**9}",
    ]
    assert main(args) == 0
    assert time.perf_counter() - t0 < 30 and "total " in capsys.readouterr().out


@pytest.mark.parametrize(
    "overrides, part",
    [
        (["model.n_layers=1000000000"], "weights, gradients and AdamW moments"),
        (["moe.router=random", f"model.vocab_size={10**11}"], "random-router tables"),
        (["moe.router=random", f"moe.num_experts={2**40}"], "building one table"),
    ],
)
def test_deep_models_and_huge_router_tables_are_refused_quickly(tmp_path, cli_error, overrides, part):
    import time

    path = write(tmp_path, BASE_TEXT)
    t0 = time.perf_counter()
    line = cli_error(["train", str(path), *overrides, f"train.out_dir={tmp_path / 'run'}"])
    assert "needs at least" in line and part in line, line
    assert time.perf_counter() - t0 < 30, "counted in closed form, nothing built per layer"
