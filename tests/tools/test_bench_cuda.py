"""Tests of moge/tools/bench_cuda.py on the CPU (its --device cpu mode): the cases, the
ratios, the report and the command line. The timings themselves need a GPU
(scripts/check_cuda.sh)."""

import json

import pytest

from moge.tools import bench_cases, bench_cuda
from moge.tools.bench_cases import BenchShape
from moge.tools.bench_cuda import CudaResult, rows_of, summary_line

TINY = BenchShape(tokens=32, d_model=16, hidden=8, experts=4, groups=2, top_k=2)


def test_ratios_are_to_the_limit_and_the_layer():
    results = [
        CudaResult("dense", "limit", [2.0, 2.0, 2.0], peak_bytes=100, grad_bytes=20),
        CudaResult("moge", "moge", [5.0, 6.0, 7.0], peak_bytes=300, grad_bytes=60),
        CudaResult("router", "part", [1.5, 1.5, 1.5]),
        CudaResult("transformers X (grouped_mm)", "peer", [4.0, 4.0, 4.0], peak_bytes=200, grad_bytes=60),
        CudaResult("transformers Y (eager)", "peer", error="no kernel"),
    ]
    rows = {r["name"]: r for r in rows_of(results)}
    assert rows["dense"]["x_limit"] == 1.0 and rows["moge"]["x_limit"] == 3.0
    assert rows["moge"]["peak_x_limit"] == 3.0
    assert rows["moge"]["act_peak_x_limit"] == pytest.approx(240 / 80)
    assert (
        rows["transformers Y (eager)"]["error"] == "no kernel"
        and "x_limit" not in rows["transformers Y (eager)"]
    )
    s = summary_line("case", list(rows.values()))
    assert s["layer_x_limit"] == 3.0 and s["router_share"] == pytest.approx(0.25)
    assert (s["best_transformers"], s["best_transformers_x_limit"]) == ("transformers X (grouped_mm)", 2.0)
    assert "failed: no kernel" in bench_cuda.format_table("t", list(rows.values()))


def test_the_command_runs_on_the_cpu_and_writes_every_row(tmp_path, monkeypatch, capsys, one_thread):
    monkeypatch.setitem(bench_cuda.CUDA_SHAPES, "tiny", TINY)
    monkeypatch.setattr(bench_cases, "transformers_version", lambda: None)
    monkeypatch.setattr(bench_cuda, "transformers_version", lambda: None)
    out = tmp_path / "bench.json"
    argv = ["--device", "cpu", "--shapes", "tiny", "--dtype", "fp32", "--rounds", "2", "--calls", "1"]
    assert bench_cuda.main([*argv, "--warmup", "0", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    (table,) = report["tables"]
    names = [r["name"] for r in table["rows"]]
    assert names[0].startswith("dense SwiGLU") and "moge MoGELayer (auto: fused)" in names
    assert "moge MoGELayer (grouped_mm)" in names and "naive per-expert loop (MoGE router)" in names
    layer = next(r for r in table["rows"] if r["kind"] == "moge")
    assert layer["x_limit"] > 0 and layer["ms"] > 0 and layer["error"] is None
    assert report["summary"][0]["case"] == "tiny fp32"
    assert "tiny T=32 d=16" in capsys.readouterr().out


@pytest.mark.parametrize(
    "argv, fragment",
    [
        (["--shapes", "nope"], "--shapes: nope not among"),
        (["--dtype", "fp8"], "--dtype: fp8 not among"),
        (["--rounds", "0"], "--rounds: must be >= 1"),
    ],
)
def test_bad_arguments_name_the_flag(argv, fragment):
    with pytest.raises(SystemExit, match=fragment):
        bench_cuda.main(["--device", "cpu", *argv])
