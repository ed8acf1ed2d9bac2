import json

import pytest
import torch
from safetensors.torch import save_file
from torch.testing import assert_close

from moge.balance import imbalance_score
from moge.tools.simulate import (
    dense_flops_per_token,
    device_traffic,
    format_table,
    plot,
    simulate,
    simulate_command,
    step_times,
    sweep,
)
from moge.training.config import load_config

BIG = "configs/pangu-pro-moe-72b.yaml"  # 64 experts, 8 groups, top-8
TINY = "configs/tiny-moge.yaml"  # 16 experts, 4 groups, top-4, d_model 128


@pytest.fixture(scope="module")
def big():
    return load_config(BIG)


@pytest.fixture(scope="module")
def tiny():
    return load_config(TINY)


def _write_trace(path, layers, num_experts, top_k, num_groups=1):
    meta = {"num_experts": str(num_experts), "top_k": str(top_k), "num_groups": str(num_groups)}
    save_file({f"layer_{i}": ids.long().contiguous() for i, ids in layers.items()}, str(path), metadata=meta)
    return path


# --- balance guarantees ------------------------------------------------------------------


@pytest.mark.parametrize("tokens", [8, 16, 40, 1000])
def test_grouped_one_group_per_device_is_exactly_balanced(big, tokens):
    r = simulate(big, 8, tokens, "grouped", 5)
    assert r.placement == "1 group/dev"
    assert r.imbalance_max == 0.0 and r.p_imbalanced == 0.0
    assert r.slots_per_device == [tokens * 8 / 8] * 8
    # T is a multiple of N: every device also sends and receives the same bytes.
    assert len(set(r.sent_mb_per_device)) == 1 and len(set(r.received_mb_per_device)) == 1
    assert r.slowdown == pytest.approx(1.0) and r.slowdown_max == pytest.approx(1.0)


def test_grouped_per_device_regroups_to_one_group_per_device(tiny):
    r = simulate(tiny, 2, 32, "grouped_per_device", 10)  # 2 groups of 8, 2 experts each
    assert r.imbalance_max == 0.0 and r.placement == "1 group/dev"


def test_grouped_with_several_groups_per_device_stays_balanced(big):
    r = simulate(big, 4, 64, "grouped", 10)
    assert r.placement == "2 groups/dev" and r.imbalance_max == 0.0


def test_grouped_with_several_devices_per_group_balances_groups_not_devices(big):
    r = simulate(big, 16, 64, "grouped", 20)
    assert r.placement == "2 dev/group"
    assert r.p_imbalanced > 0.9  # the guarantee does not reach single devices...
    pairs = torch.tensor(r.slots_per_device, dtype=torch.float64).view(8, 2).sum(dim=1)
    assert_close(pairs, torch.full((8,), 64.0, dtype=torch.float64))  # ...but every group gets T*K/M


def test_global_router_is_imbalanced_at_16_tokens(big):
    r = simulate(big, 8, 16, "global", 50)
    assert r.imbalance_mean > 0.2 and r.p_imbalanced > 0.9
    assert r.slowdown > 1.0 and r.load_max_over_mean > 1.0


def test_group_limited_uses_half_the_groups_by_default(big):
    r = simulate(big, 8, 64, "group_limited", 10)
    assert r.placement == "4 of 8 groups" and r.imbalance_mean > 0


# --- accounting and the time model ------------------------------------------------------


def test_bytes_and_times_on_a_hand_made_case(tiny, tmp_path):
    cfg = load_config(TINY, ["moe.num_experts=4", "moe.num_groups=2", "moe.top_k=2"])
    # 2 devices (experts 0-1 | 2-3); tokens 0-1 live on device 0, tokens 2-3 on device 1.
    ids = torch.tensor([[0, 2], [1, 3], [2, 3], [0, 2]])
    slots, out, inn = device_traffic(ids.unsqueeze(0), 4, 2)
    assert slots.tolist() == [[3, 5]]
    assert out.tolist() == [[2, 1]]  # tokens 0 and 1 send one slot each; token 3 one
    assert inn.tolist() == [[1, 2]]

    trace = _write_trace(tmp_path / "t.safetensors", {0: ids}, 4, 2)
    r = simulate(cfg, 2, 4, "trace", 1, trace=trace, tflops=1.0, bandwidth_gbs=1.0)
    assert r.imbalance_mean == pytest.approx(0.5)
    # Each device sends its dispatch out and the combine of what came in: 3 slots of 128 bf16.
    assert r.sent_mb_per_device == pytest.approx([3 * 256 / 1e6] * 2)
    assert r.received_mb_per_device == pytest.approx([3 * 256 / 1e6] * 2)

    # Hand-counted FLOPs of tiny-moge: attention projections + causal core at 64 + shared.
    dense = 2 * 128 * (128 + 2 * 64) + 2 * 128 * 128 + 4 * 128 * 64 + 6 * 128 * 128
    assert dense_flops_per_token(cfg) == dense
    slot = 6 * 128 * 128
    compute_ms = (5 * slot + 2 * dense) / 1e12 * 1e3  # device 1 is the slowest
    comm_ms = 2 * 2 * 256 / 1e9 * 1e3  # dispatch + combine, each max(out, in) = 2 slots
    assert r.compute_ms == pytest.approx(compute_ms) and r.comm_ms == pytest.approx(comm_ms)
    assert r.step_ms == pytest.approx(compute_ms + comm_ms)
    ideal = (8 * slot + 4 * dense) / 2 / 1e12 * 1e3 + 2 * 1.5 * 256 / 1e9 * 1e3
    assert r.ideal_ms == pytest.approx(ideal)


def test_training_triples_flops_and_doubles_traffic(tiny):
    ids = torch.randint(0, 16, (3, 32, 4), generator=torch.Generator().manual_seed(0))
    counts = device_traffic(ids, 16, 4)
    kw = dict(tflops=100.0, bandwidth_gbs=10.0, bytes_per_element=2)
    fwd = step_times(tiny, *counts, training=False, **kw)
    train = step_times(tiny, *counts, training=True, **kw)
    assert_close(train["compute"], 3 * fwd["compute"])
    assert_close(train["comm"], 2 * fwd["comm"])


@pytest.mark.parametrize("devices,tokens", [(4, 32), (4, 30), (8, 3), (16, 100), (2, 1)])
def test_slowdown_is_never_below_one(tiny, devices, tokens):
    gen = torch.Generator().manual_seed(devices * 1000 + tokens)
    ids = torch.randint(0, 16, (40, tokens, 4), generator=gen)
    ids[:5] = ids[:5] % 4  # some trials pile everything on device 0
    t = step_times(
        tiny,
        *device_traffic(ids, 16, devices),
        tflops=50.0,
        bandwidth_gbs=5.0,
        bytes_per_element=2,
        training=False,
    )
    assert bool((t["step"] >= t["ideal"] * (1 - 1e-12)).all())
    assert bool((t["step"][:5] > t["ideal"][:5]).all())


def test_sweep_routes_once_and_matches_simulate(big):
    results = sweep(big, [8, 16], [16, 64], ["grouped", "global"], 7)
    assert [(r.router, r.devices, r.tokens) for r in results] == [
        (router, n, t) for router in ("grouped", "global") for n in (8, 16) for t in (16, 64)
    ]
    alone = simulate(big, 16, 64, "global", 7)
    assert results[-1] == alone  # same seed: the same scores whatever the device count


# --- traces --------------------------------------------------------------------------------


def test_trace_replay_reproduces_the_recorded_imbalance(tiny, tmp_path):
    gen = torch.Generator().manual_seed(3)
    layers = {
        0: torch.randint(0, 16, (100, 4), generator=gen),
        5: torch.randint(0, 16, (70, 4), generator=gen),
    }
    trace = _write_trace(tmp_path / "routing_trace.safetensors", layers, 16, 4, 4)
    r = simulate(tiny, 4, 32, "trace", 50, trace=trace)
    batches = [
        layers[i][b * 32 : (b + 1) * 32]
        for i in (0, 5)
        for b in range(100 // 32)
        if (b + 1) * 32 <= layers[i].shape[0]
    ]
    assert r.trials == len(batches) == 5
    expected = sum(imbalance_score(ids, 16, 4) for ids in batches) / 5
    assert r.imbalance_mean == pytest.approx(expected)
    assert r.router == "trace" and r.placement == "recorded ids"


def test_trace_errors_name_the_option(tiny, tmp_path):
    trace = _write_trace(tmp_path / "t.safetensors", {0: torch.zeros(10, 4, dtype=torch.long)}, 16, 4)
    with pytest.raises(ValueError, match="--tokens"):
        simulate(tiny, 4, 11, "trace", 1, trace=trace)
    wrong = _write_trace(tmp_path / "w.safetensors", {0: torch.zeros(10, 4, dtype=torch.long)}, 32, 4)
    with pytest.raises(ValueError, match="--trace.*num_experts"):
        simulate(tiny, 4, 5, "trace", 1, trace=wrong)
    with pytest.raises(ValueError, match="--trace"):
        simulate(tiny, 4, 5, "trace", 1, trace=tmp_path / "missing.safetensors")
    with pytest.raises(ValueError, match="--trace"):
        simulate(tiny, 4, 5, "trace", 1)


# --- bad inputs ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs,option",
    [
        (dict(devices=3), "--devices"),
        (dict(devices=0), "--devices"),
        (dict(tokens=0), "--tokens"),
        (dict(tokens=-5), "--tokens"),
        (dict(router="topk"), "--routers"),
        (dict(router="grouped_per_device", devices=16), "--devices"),
        (dict(trials=0), "--trials"),
        (dict(tflops=0.0), "--tflops"),
        (dict(bandwidth_gbs=-1.0), "--bandwidth-gbs"),
    ],
)
def test_bad_inputs_name_the_option(big, kwargs, option):
    args = dict(devices=8, tokens=16, router="grouped", trials=2) | kwargs
    with pytest.raises(ValueError, match=option):
        simulate(big, args.pop("devices"), args.pop("tokens"), args.pop("router"), args.pop("trials"), **args)


def test_sweep_checks_every_cell_before_working(big):
    with pytest.raises(ValueError, match="--devices"):
        sweep(big, [8, 12], [16], ["grouped"], 1)


# --- outputs ------------------------------------------------------------------------------


def test_table_plot_and_command(tiny, tmp_path, capsys):
    results = sweep(tiny, [2, 4], [8, 32], ["grouped", "global"], 3)
    table = format_table(results).splitlines()
    assert len(table) == 2 + len(results) and "slowdown" in table[0]
    path = plot(results, tmp_path / "sim.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 5000

    simulate_command(TINY, [4], [16, 64], "grouped,global", 2, out=str(tmp_path / "run"))
    report = json.loads((tmp_path / "run" / "simulation.json").read_text())
    assert [(r["router"], r["tokens"]) for r in report["results"]] == [
        ("grouped", 16),
        ("grouped", 64),
        ("global", 16),
        ("global", 64),
    ]
    assert report["tflops"] == 300.0 and report["bytes_per_element"] == 2
    assert (tmp_path / "run" / "simulation.png").read_bytes()[:4] == b"\x89PNG"
    assert "| grouped" in capsys.readouterr().out


def test_cli_simulate(tmp_path, capsys):
    from moge.cli import main

    out = tmp_path / "sim"
    assert main(["simulate", "configs/tiny-moge.yaml", "--devices", "4", "--tokens", "16", "--trials", "8",
                 "--out", str(out)]) == 0  # fmt: skip
    table = capsys.readouterr().out
    assert "| grouped " in table and "| global " in table
    assert (out / "simulation.json").exists() and (out / "simulation.png").exists()
    assert main(["simulate", "configs/tiny-moge.yaml", "--devices", "3", "--tokens", "16"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: --devices")
