"""The layer benchmark's report as plain-text tables (moge/tools/bench.py measures).

Legend: T tokens, d d_model, f expert hidden, E experts, M groups, K experts per token.

Every table repeats the machine line that matters for reading it: the CPU, its
matrix-relevant instruction flags and which dtype the bf16 products run in. Ratios come
in two clocks: wall time (the medians the header describes) and process CPU time of the
same calls ("cpu x"), which other processes on shared cores do not inflate (with one
torch thread it is the time the call ran on a core).
"""

from __future__ import annotations

from moge.tools.bench_cases import BenchShape

# Rows labelled with this dtype name ran bf16 storage with float32 products (bench.FORCED_FP32).
_FORCED_NOTE = (
    "bf16/f32: bf16 weights and activations, products forced to float32 on up-cast operands "
    "(precision.float32_products): the path of CPUs without bf16 matrix instructions"
)


def _ms(d: dict | None) -> str:
    if not d:
        return "-"
    return f"{d['median']:9.1f} [{d['q1']:.0f}-{d['q3']:.0f}]"


def machine_line(m: dict) -> str:
    """CPU, cores, threads, instruction flags, where bf16 products run, versions."""
    return (
        f"machine: {m['cpu']}, {m['cores']} cores, {m['torch_threads']} torch threads, "
        f"{m['cpu_capability']} ({m.get('cpu_features', 'flags unknown')}); bf16 products: "
        f"{m['bf16_products']}; torch {m['torch']}; transformers {m['transformers'] or 'not installed'}"
    )


def _headline(dtype: str, rows: list[dict]) -> str:
    """The issue's targets for one dtype, from the table's own rows."""
    timed = [r for r in rows if "fwd_bwd_ms" in r]
    layer = next((r for r in timed if r["kind"] == "moge"), None)
    if layer is None:
        return f"{dtype}: the MoGE layer was not timed"
    parts = [
        f"{dtype}: MoGE layer {layer['x_limit']:.2f}x the dense limit ({layer['x_limit_cpu']:.2f}x in CPU time)"
    ]
    hf = [r for r in timed if r["name"].startswith("transformers")]
    if hf:
        best = min(hf, key=lambda r: r["fwd_bwd_ms"]["median"])
        parts.append(
            f"fastest transformers block, {best['name'][len('transformers ') :]}, takes {best['x_moge']:.2f}x its time"
            f" ({best['x_moge_cpu']:.2f}x in CPU time)"
        )
    router = next((r for r in timed if r["kind"] == "part"), None)
    if router is not None:
        parts.append(
            f"router {100 * router['x_moge']:.1f}% of the layer ({100 * router['x_moge_cpu']:.1f}% in CPU time)"
        )
    if layer.get("peak_x_limit") is not None:
        parts.append(
            f"peak memory {layer['peak_x_limit']:.2f}x the limit's ({layer['act_peak_x_limit']:.2f}x without weight gradients)"
        )
    return "; ".join(parts)


def _main_tables(report: dict) -> list[str]:
    head = (
        f"{'dtype':8} {'implementation':58} {'fwd ms [IQR]':>20} {'fwd+bwd ms [IQR]':>22} {'n':>3} "
        f"{'tok/s':>7} {'peak MB':>8} {'grads':>6} {'x limit':>7} {'cpu x':>6} {'peak x':>6} {'-grads':>6}"
    )
    lines = []
    for d, rows in report["tables"].items():
        lines += ["", head, "-" * len(head)]
        for r in rows:
            if "skipped" in r:
                lines.append(f"{d:8} {r['name']:58} skipped: {r['skipped']}")
                continue
            peak = "-" if r["peak_mb"] is None else f"{r['peak_mb']:.1f}"
            px = "-" if r.get("peak_x_limit") is None else f"{r['peak_x_limit']:.2f}"
            ax = "-" if r.get("act_peak_x_limit") is None else f"{r['act_peak_x_limit']:.2f}"
            lines.append(
                f"{d:8} {r['name']:58} {_ms(r['fwd_ms']):>20} {_ms(r['fwd_bwd_ms']):>22} {r['samples']:3d} "
                f"{r['tokens_per_s']:7.0f} {peak:>8} {r['grad_mb']:6.1f} {r['x_limit']:7.2f} "
                f"{r['x_limit_cpu']:6.2f} {px:>6} {ax:>6}"
            )
        lines.append(_headline(d, rows))
    return lines


def _row(rows: list[dict], kind: str) -> dict | None:
    return next((r for r in rows if r["kind"] == kind and "fwd_bwd_ms" in r), None)


def _sweep_tables(report: dict, machine: str) -> list[str]:
    lines = []
    for d, sweep in report.get("sweep", {}).items():
        lines += ["", f"token sweep ({d}): forward+backward median ms, and ms per 1k tokens; {machine}"]
        lines.append(
            f"{'T':>7} {'dense limit ms':>15} {'MoGE ms':>10} {'MoGE ms/1k tok':>15} {'x limit':>8} {'cpu x':>6}"
        )
        for point in sweep:
            dense, moge = _row(point["rows"], "limit"), _row(point["rows"], "moge")
            if moge is None or dense is None:
                lines.append(f"{point['tokens']:>7} {'skipped':>15}")
                continue
            mm, dm = moge["fwd_bwd_ms"]["median"], dense["fwd_bwd_ms"]["median"]
            lines.append(
                f"{point['tokens']:>7} {dm:15.1f} {mm:10.1f} {mm / point['tokens'] * 1e3:15.2f} "
                f"{moge['x_limit']:8.2f} {moge['x_limit_cpu']:6.2f}"
            )
    return lines


def _small_tables(report: dict, machine: str) -> list[str]:
    lines = []
    for d, table in report.get("small_shapes", {}).items():
        lines += [
            "",
            f"small shapes ({d}): the tiny/small configs' layers, E=16 M=4 K=4, forward+backward; {machine}",
        ]
        lines.append(
            f"{'T':>6} {'d':>4} {'f':>4} {'n':>4} {'dense ms':>9} {'MoGE ms':>9} {'x limit':>8} {'cpu x':>6} "
            f"{'router %':>9} {'cpu %':>6} {'peak x':>7} {'-grads':>7}"
        )
        for point in table:
            s = point["shape"]
            dense, layer, router = (_row(point["rows"], k) for k in ("limit", "moge", "part"))
            if layer is None or dense is None:
                lines.append(f"{s['tokens']:>6} {s['d_model']:>4} {s['hidden']:>4} skipped")
                continue
            px = "-" if layer.get("peak_x_limit") is None else f"{layer['peak_x_limit']:.2f}"
            ax = "-" if layer.get("act_peak_x_limit") is None else f"{layer['act_peak_x_limit']:.2f}"
            share = "-" if router is None else f"{100 * router['x_moge']:.1f}"
            share_cpu = "-" if router is None else f"{100 * router['x_moge_cpu']:.1f}"
            lines.append(
                f"{s['tokens']:>6} {s['d_model']:>4} {s['hidden']:>4} {point.get('rounds', 0):>4} "
                f"{dense['fwd_bwd_ms']['median']:9.1f} {layer['fwd_bwd_ms']['median']:9.1f} "
                f"{layer['x_limit']:8.2f} {layer['x_limit_cpu']:6.2f} {share:>9} {share_cpu:>6} {px:>7} {ax:>7}"
            )
    return lines


def format_report(report: dict) -> str:
    """The report as plain-text tables: one per dtype, then the sweep and the small shapes."""
    m, s = report["machine"], BenchShape(**report["shape"])
    machine = machine_line(m)
    lines = [
        f"MoGE layer benchmark, {s.describe()}; forward+backward, routing changes every call",
        machine,
        f"load average (1, 5, 15 min) at start: {m['load_average']}, at end: {report.get('load_average_end')}",
        f"median [IQR] over {report['iters']} rounds (round-robin, after {report['warmup']} warm-up); "
        "x limit = forward+backward / fastest dense SwiGLU of width K*f in the same dtype; "
        "cpu x: the same ratio in process CPU time of the same calls",
        "peak MB: allocator peak of one forward+backward, weight gradients (grads MB) included; "
        "peak x: that / the limit's; -grads: the same without the weight gradients on both sides",
    ]
    lines += _main_tables(report) + _sweep_tables(report, machine) + _small_tables(report, machine)
    names = set(report["tables"]) | set(report.get("sweep", {})) | set(report.get("small_shapes", {}))
    notes = list(report.get("notes", [])) + ([_FORCED_NOTE] if "bf16/f32" in names else [])
    for note in notes:
        lines.append(f"note: {note}")
    return "\n".join(lines)
