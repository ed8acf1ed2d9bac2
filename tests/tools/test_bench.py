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
