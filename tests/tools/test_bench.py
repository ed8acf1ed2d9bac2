import json

import pytest
import torch

from moge.tools import bench, bench_cases
from moge.tools.bench import format_report, peak_memory_bytes, project_seconds, run_layer_benchmark
from moge.tools.bench_cases import BenchShape

TINY = BenchShape(tokens=64, d_model=16, hidden=8, experts=4, groups=2, top_k=2)


def test_peak_memory_counts_live_bytes_not_total_allocations():
    keep = []
    assert peak_memory_bytes(lambda: keep.append(torch.empty(250_000))) == 1_000_000

    def sequential():  # two 1 MB blocks, never alive together
        a = torch.empty(250_000)
        del a
        b = torch.empty(250_000)
        return b.numel()

    def overlapping():
        a = torch.empty(250_000)
        b = torch.empty(250_000)
        return a.numel() + b.numel()

    assert peak_memory_bytes(sequential) == 1_000_000
    assert peak_memory_bytes(overlapping) == 2_000_000


def test_report_rows_ratios_and_table(monkeypatch):
    monkeypatch.setattr(bench_cases, "transformers_version", lambda: None)
    report = run_layer_benchmark(TINY, ("fp32",), iters=2, warmup=0, peers=True, sweep_tokens=(32, 64))
    rows = {r["name"]: r for r in report["tables"]["fp32"]}
    limit = next(r for r in rows.values() if r["kind"] == "limit")
    assert limit["x_limit"] == pytest.approx(1.0) and limit["samples"] == 2
    layer = rows["moge MoGELayer (fused, default)"]
    assert layer["fwd_bwd_ms"]["median"] >= layer["fwd_ms"]["median"] > 0
    assert layer["x_moge"] == pytest.approx(1.0) and layer["peak_mb"] > 0
    # Weight gradients: E experts of 3*d*f, router d*E (float32), all kept in .grad.
    E, d, f = TINY.experts, TINY.d_model, TINY.hidden
    assert layer["grad_mb"] * 2**20 == 4 * (E * 3 * d * f + d * E)
    assert layer["grad_mb"] < layer["peak_mb"]
    expected = (layer["peak_mb"] - layer["grad_mb"]) / (limit["peak_mb"] - limit["grad_mb"])
    assert layer["act_peak_x_limit"] == pytest.approx(expected)
    assert any("transformers peers skipped" in n for n in report["notes"])
    assert [p["tokens"] for p in report["sweep"]["fp32"]] == [32, 64]
    text = format_report(report)
    assert "moge MoGELayer (fused, default)" in text and "naive per-expert loop" in text
    assert "token sweep (fp32)" in text and "transformers peers skipped" in text
    assert "fp32: MoGE layer" in text and "router" in text and "peak memory" in text
    json.dumps(report)  # the --json output


def test_slow_peers_are_skipped_or_sampled_less_but_never_the_layer(monkeypatch):
    monkeypatch.setattr(bench_cases, "transformers_version", lambda: None)
    monkeypatch.setattr(bench, "_probe", lambda case, shape, dtype, seed: 1e4)
    report = run_layer_benchmark(TINY, ("fp32",), iters=4, warmup=0, peers=True, max_call_seconds=50.0)
    rows = report["tables"]["fp32"]
    optional = [r for r in rows if r["optional"]]
    assert {r["kind"] for r in optional} == {"peer", "moge"}  # the layer's slower paths too
    assert all("projected at ~10000 s" in r["skipped"] for r in optional)
    assert all(r["samples"] == 4 for r in rows if not r["optional"])
    assert "moge MoGELayer (fused, default)" in [r["name"] for r in rows if not r["optional"]]
    assert "skipped: one call projected" in format_report(report)
    monkeypatch.setattr(bench, "_probe", lambda case, shape, dtype, seed: 20.0)  # slow, not too slow
    report = run_layer_benchmark(TINY, ("fp32",), iters=4, warmup=0, peers=True, max_call_seconds=50.0)
    assert all(r["samples"] == (3 if r["optional"] else 4) for r in report["tables"]["fp32"])


def test_max_call_x_skips_by_the_limit_s_projected_call(monkeypatch):
    """Peers projected over max_call_x times the dense limit's projected call are skipped,
    whatever the machine's speed; those under it run; the limit and the layer always run."""
    monkeypatch.setattr(bench_cases, "transformers_version", lambda: None)
    speeds = {"limit": 2.0, "moge": 4.0, "peer": 9.0}  # seconds per projected call, by kind
    monkeypatch.setattr(bench, "_probe", lambda case, shape, dtype, seed: speeds[case.kind])
    report = run_layer_benchmark(TINY, ("fp32",), iters=2, warmup=0, peers=True, max_call_x=2.5)
    rows = report["tables"]["fp32"]
    skipped = {r["kind"] for r in rows if r.get("skipped")}
    timed = {r["kind"] for r in rows if r["samples"]}
    assert skipped == {"peer"} and {"limit", "moge"} <= timed
    assert all("max_call_x=2.5 times the limit's ~2.0 s" in r["skipped"] for r in rows if r.get("skipped"))
    assert report["max_call_x"] == 2.5
    report = run_layer_benchmark(TINY, ("fp32",), iters=2, warmup=0, peers=True, max_call_x=5.0)
    assert not any(r.get("skipped") for r in report["tables"]["fp32"])
    with pytest.raises(ValueError, match="max_call_x"):
        run_layer_benchmark(TINY, ("fp32",), iters=1, warmup=0, max_call_x=0.0)


def test_main_prints_table_and_writes_json(tmp_path, capsys):
    out = tmp_path / "r.json"
    argv = ["--tokens", "32", "--d-model", "16", "--hidden", "8", "--experts", "4", "--groups", "2",
            "--top-k", "2", "--dtype", "fp32", "--iters", "1", "--warmup", "0", "--no-peers", "--quiet",
            "--json", str(out)]  # fmt: skip
    assert bench.main(argv) == 0
    assert "moge MoGELayer (fused, default)" in capsys.readouterr().out
    assert json.loads(out.read_text())["shape"]["tokens"] == 32
    assert bench.main(["--dtype", "fp16", "--quiet"]) == 2
    assert "dtype" in capsys.readouterr().err


def test_projection_keeps_fixed_costs_fixed():
    # t(T) = 2 s fixed + 16 s per T: 3 s at T/16, 4 s at T/8 -> 18 s at T (not 4 * 8 = 32).
    assert project_seconds(3.0, 4.0) == pytest.approx(18.0)
    assert project_seconds(4.0, 4.0) == 4.0  # all fixed cost
    assert project_seconds(5.0, 4.0) == 4.0  # noise: never below the T/8 call


def test_small_shapes_table(monkeypatch):
    shapes = (BenchShape(32, 16, 16, 4, 2, 2), BenchShape(64, 16, 16, 4, 2, 2))
    monkeypatch.setattr(bench, "SMALL_SHAPES", shapes)
    report = run_layer_benchmark(TINY, ("fp32",), iters=2, warmup=0, peers=False, small_shapes=True)
    table = report["small_shapes"]["fp32"]
    assert [p["shape"]["tokens"] for p in table] == [32, 64]
    for point in table:
        kinds = {r["kind"]: r for r in point["rows"]}
        assert set(kinds) == {"limit", "moge", "part"} and kinds["limit"]["x_limit"] == pytest.approx(1.0)
    text = format_report(report)
    assert "small shapes (fp32)" in text and "router %" in text
    assert len([line for line in text.splitlines() if line.strip().startswith(("32 ", "64 "))]) == 2
    json.dumps(report)


def test_main_threads_option(capsys):
    n = torch.get_num_threads()
    argv = ["--tokens", "32", "--d-model", "16", "--hidden", "8", "--experts", "4", "--groups", "2",
            "--top-k", "2", "--dtype", "fp32", "--iters", "1", "--warmup", "0", "--no-peers", "--quiet",
            "--threads", "1"]  # fmt: skip
    try:
        assert bench.main(argv) == 0
        assert torch.get_num_threads() == 1
        assert bench.main(argv[:-1] + ["0"]) == 2
        assert "threads" in capsys.readouterr().err
    finally:
        torch.set_num_threads(n)


def test_forced_float32_products_table_only_where_bf16_is_native(monkeypatch):
    from moge.kernels import precision

    monkeypatch.setattr(bench_cases, "transformers_version", lambda: None)
    monkeypatch.setattr(precision, "_cpu_has_native", lambda dtype: True)
    report = run_layer_benchmark(TINY, ("bf16/f32",), iters=2, warmup=0, peers=True)
    rows = report["tables"]["bf16/f32"]
    # The limit is the float32-products dense SwiGLU alone (torch's bf16 matmul is native here).
    assert [r["name"] for r in rows if r["kind"] == "limit"] == ["dense SwiGLU width K*f=16 (fp32 products)"]
    assert {r["kind"] for r in rows} == {"limit", "moge", "part"}  # no peers: the bf16 table has them
    assert all(r["dtype"] == "bf16/f32" for r in rows)
    text = format_report(report)
    assert "bf16/f32" in text and "products forced to float32" in text
    monkeypatch.setattr(precision, "_cpu_has_native", lambda dtype: False)
    report = run_layer_benchmark(TINY, ("fp32", "bf16/f32"), iters=1, warmup=0, peers=False)
    assert list(report["tables"]) == ["fp32"]
    assert any("bf16/f32 left out" in n for n in report["notes"])
    with pytest.raises(ValueError, match="dtype"):
        run_layer_benchmark(TINY, ("fp16",), iters=1, warmup=0, peers=False)


def test_cpu_time_ratios_and_machine_flags_in_every_table(monkeypatch):
    monkeypatch.setattr(bench, "SMALL_SHAPES", (BenchShape(32, 16, 16, 4, 2, 2),))
    report = run_layer_benchmark(
        TINY, ("fp32",), iters=2, warmup=0, peers=False, sweep_tokens=(32,), small_shapes=True
    )
    layer = next(r for r in report["tables"]["fp32"] if r["kind"] == "moge")
    assert layer["fwd_bwd_cpu_ms"]["median"] > 0
    limit = next(r for r in report["tables"]["fp32"] if r["kind"] == "limit")
    assert limit["x_limit_cpu"] == pytest.approx(1.0)
    assert layer["x_limit_cpu"] == pytest.approx(
        layer["fwd_bwd_cpu_ms"]["median"] / limit["fwd_bwd_cpu_ms"]["median"]
    )
    text = format_report(report)
    flags = report["machine"]["cpu_features"]
    assert flags and text.count(flags) == 3  # the header, the sweep and the small-shapes table
    assert "cpu x" in text and "in CPU time" in text


def test_cheap_shapes_get_more_rounds():
    assert bench.rounds_for(bench_cases.SHAPES["small"], 4) == 4
    assert bench.rounds_for(BenchShape(2048, 128, 128, 16, 4, 4), 4) == 32  # 16x cheaper: capped at 8x
    assert bench.rounds_for(BenchShape(4096, 256, 256, 16, 4, 4), 4) == 8
    assert bench.rounds_for(bench_cases.SHAPES["large"], 4) == 4  # never fewer


def test_cpu_features_names_the_matrix_flags():
    text = bench.cpu_features()
    assert text == "unknown" or "amx_bf16" in text  # either listed or "(no amx_bf16)"


@pytest.mark.parametrize(
    "args,option",
    [
        (["--iters", "0"], "iters"),
        (["--iters", "-2"], "iters"),
        (["--warmup", "-1"], "warmup"),
        (["--max-call-seconds", "0"], "max_call_seconds"),
        (["--sweep-tokens", "32,0"], "sweep_tokens"),
    ],
)
def test_main_refuses_bad_rounds_and_limits_naming_the_option(capsys, args, option):
    argv = ["--tokens", "32", "--d-model", "16", "--hidden", "8", "--experts", "4", "--groups", "2",
            "--top-k", "2", "--dtype", "fp32", "--iters", "1", "--no-peers", "--quiet", *args]  # fmt: skip
    assert bench.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: {option}:")


@pytest.mark.parametrize("module", ["bench_train", "bench_generate", "bench_sparsity"])
def test_every_benchmark_cli_refuses_zero_threads_in_one_line(capsys, module):
    import importlib

    main = importlib.import_module(f"moge.tools.{module}").main
    n = torch.get_num_threads()
    try:
        assert main(["configs/tiny-moge.yaml", "--threads", "0", "--quiet"]) == 2
    finally:
        torch.set_num_threads(n)
    assert capsys.readouterr().err.strip().splitlines() == ["error: threads: must be >= 1, got 0"]


@pytest.mark.parametrize(
    "flag, expected",
    [
        ("--iters", "an integer"),
        ("--max-call-seconds", "a number"),
        ("--sweep-tokens", "comma-separated integers"),
    ],
)
def test_moge_bench_bad_number_names_the_flag_and_what_it_takes(cli_error, flag, expected):
    """As the rest of `moge` reads, not argparse's "invalid int value: 'abc'"."""
    line = cli_error(["bench", flag, "abc"])
    assert line.startswith(f"error: argument {flag}: expected {expected}, got 'abc'"), line


@pytest.mark.parametrize("tool, flag", [("bench_cuda", "--rounds"), ("bench_generate", "--tokens"),
                                        ("bench_sparsity", "--seconds"), ("bench_train", "--steps")])  # fmt: skip
def test_the_bench_scripts_name_a_bad_numbers_flag(capsys, tool, flag):
    import importlib

    with pytest.raises(SystemExit):
        importlib.import_module(f"moge.tools.{tool}").build_parser().parse_args([flag, "abc"])
    assert f"argument {flag}: expected a" in capsys.readouterr().err
