"""Tests of moge/tools/evaluate.py and moge/tools/plots.py on two tiny trained runs (grouped vs global)."""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file
from torch.testing import assert_close

from moge.testing import assert_group_quota
from moge.tools.evaluate import (
    compare_runs,
    cooccurrence_counts,
    eval_command,
    evaluate_run,
    format_report,
    loss_summary,
    read_metrics,
    top_pairs,
)
from moge.training import train
from moge.training.checkpoint import load_run
from moge.training.config import RunConfig, config_from_dict
from moge.training.data import load_dataset

E, M, K = 8, 4, 4
STEPS, EVAL_BATCHES, EVAL_BS, SEQ = 10, 3, 4, 32
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
PLOTS = ("training_curve.png", "expert_load_heatmap.png", "imbalance_per_layer.png")


def tiny_config(router: str, out_dir: Path, plots: bool) -> RunConfig:
    return config_from_dict({
        "name": f"tiny-{router}",
        "model": dict(vocab_size=256, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=SEQ),
        "moe": dict(num_experts=E, num_groups=M, top_k=K, expert_hidden=16, num_shared_experts=1,
                    router=router, learned_expert_scale=True),
        "data": dict(seq_len=SEQ),
        "train": dict(steps=STEPS, batch_size=4, warmup_steps=2, log_every=STEPS, eval_every=0,
                      eval_batches=2, save_every=0, out_dir=str(out_dir)),
        "eval": dict(batches=EVAL_BATCHES, batch_size=EVAL_BS, plots=plots),
    })  # fmt: skip


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """Two 10-step runs: MoGE (plots on) and global top-k (cfg.eval.plots off)."""
    root = tmp_path_factory.mktemp("runs")
    out = {}
    for router, plots in (("grouped", True), ("global", False)):
        out[router] = root / router
        train(tiny_config(router, out[router], plots), progress=False)
    return out


@pytest.fixture(scope="module")
def reports(runs) -> dict[str, dict]:
    return {router: evaluate_run(path) for router, path in runs.items()}


def copy_run(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


# ---------------------------------------------------------------- losses


def test_report_leads_with_losses_and_they_agree(reports):
    report = reports["grouped"]
    assert list(report)[:4] == ["val_loss", "val_ppl", "val_bpb", "val_bits_per_token"]
    assert report["val_ppl"] == pytest.approx(math.exp(report["val_loss"]), rel=1e-12)
    assert report["val_bpb"] == pytest.approx(report["val_loss"] / math.log(2), rel=1e-12)
    assert report["tokenizer"] == "bytes" and report["step"] == STEPS
    assert report["eval"]["tokens"] == EVAL_BATCHES * EVAL_BS * SEQ
    assert report["params"]["total"] > report["params"]["activated"] > 0
    assert 0 < report["unigram_entropy_bits"] < 8  # bytes of English text
    on_disk = json.loads(Path(report["files"]["report"]).read_text())
    assert list(on_disk)[:3] == ["val_loss", "val_ppl", "val_bpb"]
    assert on_disk["val_loss"] == report["val_loss"]


def test_val_loss_is_the_token_mean_nll(runs, reports):
    model, cfg, _ = load_run(runs["grouped"])
    ds = load_dataset(cfg.data)
    nll, n = 0.0, 0
    with torch.no_grad():
        for x_BL, y_BL in ds.iter_eval_batches("val", EVAL_BS, EVAL_BATCHES):
            logits = model(x_BL).logits
            nll += float(F.cross_entropy(logits.flatten(0, 1), y_BL.flatten(), reduction="sum"))
            n += y_BL.numel()
    assert_close(reports["grouped"]["val_loss"], nll / n, rtol=1e-5, atol=0)


def test_loss_summary_bin_corpus_reports_bits_per_token_only():
    out = loss_summary(2.0, byte_level=False)
    assert list(out) == ["val_loss", "val_ppl", "val_bpb", "val_bits_per_token"]
    assert out["val_bpb"] is None
    assert out["val_bits_per_token"] == pytest.approx(2.0 / math.log(2))
    assert loss_summary(1000.0, byte_level=True)["val_ppl"] == math.inf


def test_batches_argument_overrides_the_config(runs, tmp_path):
    report = evaluate_run(runs["grouped"], batches=1, out_dir=tmp_path, plots=False)
    assert report["eval"]["batches"] == 1 and report["eval"]["tokens"] == EVAL_BS * SEQ
    assert not any((tmp_path / name).exists() for name in PLOTS)
    with pytest.raises(ValueError, match="^batches:"):
        evaluate_run(runs["grouped"], batches=0)


# ---------------------------------------------------------------- routing report


def test_grouped_router_has_zero_imbalance_and_equal_group_loads(reports):
    layers = reports["grouped"]["routing"]
    assert [r["layer"] for r in layers] == [0, 1]
    tokens = reports["grouped"]["eval"]["tokens"]
    for r in layers:
        assert r["imbalance_score"] == 0.0 and r["imbalance_score_batch_max"] == 0.0
        assert r["group_load"] == [tokens * K // M] * M
        assert sum(r["expert_load"]) == tokens * K


def test_global_router_is_imbalanced(reports):
    layers = reports["global"]["routing"]
    assert max(r["imbalance_score"] for r in layers) > 0
    assert max(r["imbalance_score_batch_mean"] for r in layers) > 0
    assert any(len(set(r["group_load"])) > 1 for r in layers)


@pytest.mark.parametrize("router", ["grouped", "global"])
def test_cooccurrence_identities(reports, router):
    for r in reports[router]["routing"]:
        cooc = torch.tensor(r["cooccurrence"], dtype=torch.float64)
        load = torch.tensor(r["expert_load"], dtype=torch.float64)
        assert_close(cooc, cooc.T)
        assert bool((cooc.diagonal() == 0).all())
        assert_close(cooc.sum(dim=1), (K - 1) * load / r["tokens"])
        pairs = r["top_pairs"]
        rates = [p["rate"] for p in pairs]
        assert len(pairs) == 10 and rates == sorted(rates, reverse=True)
        assert rates[0] == cooc.max().item()
        for p in pairs:
            i, j = p["experts"]
            assert (
                i < j
                and p["rate"] == cooc[i, j].item()
                and p["same_group"] == (i // (E // M) == j // (E // M))
            )


def test_grouped_router_never_pairs_experts_of_one_group(reports):
    # K/M = 1: a token takes exactly one expert per group, so within-group pairs never occur.
    for r in reports["grouped"]["routing"]:
        cooc = torch.tensor(r["cooccurrence"])
        for g in range(M):
            block = cooc[g * (E // M) : (g + 1) * (E // M), g * (E // M) : (g + 1) * (E // M)]
            assert bool((block == 0).all())
        assert not any(p["same_group"] for p in r["top_pairs"])


def test_cooccurrence_counts_match_a_brute_force_count():
    gen = torch.Generator().manual_seed(0)
    ids_TK = torch.stack([torch.randperm(E, generator=gen)[:3] for _ in range(50)])
    expected = torch.zeros(E, E, dtype=torch.float64)
    for row in ids_TK.tolist():
        for a in row:
            for b in row:
                if a != b:
                    expected[a, b] += 1
    assert_close(cooccurrence_counts(ids_TK, E), expected)
    pairs = sorted((-expected[i, j].item(), i, j) for i in range(E) for j in range(i + 1, E))
    assert [p["experts"] for p in top_pairs(expected, E // M, n=3)] == [[i, j] for _, i, j in pairs[:3]]


def test_routing_trace_holds_every_moe_layer(reports):
    report = reports["grouped"]
    path = report["files"]["trace"]
    trace = load_file(path)
    with safe_open(path, framework="pt") as f:
        meta = f.metadata()
    assert sorted(trace) == ["layer_0", "layer_1"]
    assert (meta["num_experts"], meta["num_groups"], meta["top_k"]) == (str(E), str(M), str(K))
    assert [int(n) for n in meta["batch_tokens"].split(",")] == [EVAL_BS * SEQ] * EVAL_BATCHES
    for r in report["routing"]:
        ids_TK = trace[f"layer_{r['layer']}"]
        assert ids_TK.shape == (report["eval"]["tokens"], K) and ids_TK.dtype == torch.int64
        assert torch.bincount(ids_TK.flatten(), minlength=E).tolist() == r["expert_load"]
        assert_group_quota(ids_TK, num_experts=E, num_groups=M, top_k=K)


# ---------------------------------------------------------------- files and text


def test_plots_are_written_as_pngs(reports):
    written = reports["grouped"]["files"]["plots"]
    assert [Path(p).name for p in written] == list(PLOTS)
    for p in written:
        data = Path(p).read_bytes()
        assert data[:8] == PNG_SIGNATURE and len(data) > 5_000


def test_plots_follow_cfg_eval_plots(runs, reports):
    assert reports["global"]["files"]["plots"] == []
    assert not any((runs["global"] / name).exists() for name in PLOTS)


def test_format_report_shows_losses_and_one_row_per_layer(reports):
    report = reports["global"]
    text = format_report(report)
    assert f"val_loss {report['val_loss']:.4f}" in text and "tiny-global" in text
    rows = [line for line in text.splitlines() if line.split()[0] in ("0", "1")]
    assert len(rows) == len(report["routing"])
    assert f"{report['routing'][0]['imbalance_score']:.4f}" in rows[0]


def test_compare_runs_writes_table_figure_and_json(runs, reports):
    dirs = [runs["grouped"], runs["global"]]
    result = compare_runs(dirs, reports=[reports["grouped"], reports["global"]])
    out = Path(result["out_dir"])
    assert out == runs["grouped"].parent / "compare-grouped-vs-global"
    assert result["runs"] == ["grouped", "global"]
    table = (out / "comparison.txt").read_text()
    assert "grouped" in table and "global" in table and "val_loss" in table
    assert result["rows"]["val_loss"] == [reports["grouped"]["val_loss"], reports["global"]["val_loss"]]
    assert result["rows"]["IS per batch (mean of layers)"][0] == 0.0
    assert result["rows"]["IS per batch (mean of layers)"][1] > 0.0
    assert json.loads((out / "comparison.json").read_text())["rows"] == result["rows"]
    data = (out / "comparison.png").read_bytes()
    assert data[:8] == PNG_SIGNATURE and len(data) > 5_000


def test_a_dense_run_is_evaluated_plotted_and_compared(runs, reports, tmp_path):
    # Every block dense (the dense run the README upcycles): no routing to report or draw;
    # the plots and the comparison's routing rows used to fail on the empty routing list.
    cfg = tiny_config("grouped", tmp_path / "dense", plots=True)
    dense = dataclasses.replace(cfg.model, first_dense_layers=cfg.model.n_layers)
    train(
        dataclasses.replace(cfg, model=dense, train=dataclasses.replace(cfg.train, steps=1)), progress=False
    )
    report = evaluate_run(tmp_path / "dense", batches=1)
    assert report["routing"] == [] and math.isfinite(report["val_loss"])
    assert [Path(p).name for p in report["files"]["plots"]] == ["training_curve.png"]
    result = compare_runs(
        [runs["grouped"], tmp_path / "dense"], tmp_path / "cmp", reports=[reports["grouped"], report]
    )
    assert result["rows"]["IS per batch (mean of layers)"] == [0.0, None]
    assert result["rows"]["dead experts (all layers)"][1] is None
    assert "n/a" in result["table"]


def test_eval_command_one_and_several_runs(runs, tmp_path, capsys):
    a = copy_run(runs["grouped"], tmp_path / "a")
    b = copy_run(runs["global"], tmp_path / "b")
    eval_command([str(a)], batches=1, out=str(tmp_path / "single"))
    assert "val_loss" in capsys.readouterr().out
    assert (tmp_path / "single" / "report.json").exists() and (
        tmp_path / "single" / "training_curve.png"
    ).exists()
    eval_command([str(a), str(b)], batches=1, out=str(tmp_path / "cmp"))
    printed = capsys.readouterr().out
    assert "tiny-grouped" in printed and "tiny-global" in printed and "comparison written to" in printed
    assert json.loads((tmp_path / "cmp" / "comparison.json").read_text())["runs"] == ["a", "b"]
    assert json.loads((a / "report.json").read_text())["eval"]["batches"] == 1


# ---------------------------------------------------------------- errors


def test_missing_run_dir_is_named(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(FileNotFoundError, match="nope"):
        evaluate_run(missing)
    with pytest.raises(FileNotFoundError, match="nope"):
        eval_command([str(missing)])


def test_run_without_checkpoint_is_named(runs, tmp_path):
    run = tmp_path / "fresh"
    run.mkdir()
    shutil.copy(runs["grouped"] / "config.yaml", run / "config.yaml")
    with pytest.raises(FileNotFoundError, match=str(run / "checkpoints" / "LATEST")):
        evaluate_run(run)


def test_run_without_or_with_broken_metrics_is_named(runs, tmp_path):
    run = copy_run(runs["grouped"], tmp_path / "run")
    lines = (run / "metrics.jsonl").read_text().splitlines()
    (run / "metrics.jsonl").write_text("\n".join(lines[:2] + ["{not json"]) + "\n")
    with pytest.raises(ValueError, match=r"metrics\.jsonl:3"):
        read_metrics(run)
    (run / "metrics.jsonl").unlink()
    with pytest.raises(FileNotFoundError, match=str(run / "metrics.jsonl")):
        evaluate_run(run)


def test_bad_run_lists_are_refused(runs):
    with pytest.raises(ValueError, match="^run_dirs:"):
        eval_command([])
    with pytest.raises(ValueError, match="^run_dirs:"):
        compare_runs([runs["grouped"]])


def test_a_two_level_run_whose_subfolder_domains_changed_is_refused(tmp_path):
    """data.domains: subfolders reads its domains from the folder at eval time: a folder gone
    shifts the ids, and the model would route one domain's sequences to another's experts."""
    data = tmp_path / "data"
    for name, text in (("alpha", "def f(x):\n    return x + 1\n"), ("beta", "SELECT a FROM t;\n"),
                       ("gamma", "The quick brown fox.\n")):  # fmt: skip
        (data / name).mkdir(parents=True)
        (data / name / "file.txt").write_text(text * 40)
    cfg = config_from_dict({
        "name": "sub-domains",
        "model": dict(vocab_size=256, d_model=16, n_layers=1, n_heads=2, n_kv_heads=1, max_seq_len=16),
        "moe": dict(num_experts=6, num_groups=3, top_k=2, expert_hidden=8, router="random",
                    rre_domain_groups={"alpha": [0], "beta": [1], "gamma": [2]}),
        "data": dict(seq_len=16, path=str(data), domains="subfolders"),
        "train": dict(steps=1, batch_size=2, warmup_steps=1, eval_every=0, eval_batches=1, save_every=0,
                      threads=1, out_dir=str(tmp_path / "run")),
        "eval": dict(batches=1, batch_size=2, plots=False),
    })  # fmt: skip
    n = torch.get_num_threads()
    train(cfg, progress=False)
    torch.set_num_threads(n)
    assert evaluate_run(tmp_path / "run")["val_loss"] > 0
    shutil.rmtree(data / "beta")  # gamma's sequences now carry id 1, beta's groups
    with pytest.raises(ValueError, match="rre_domain_groups: domain 'beta' is not in the data"):
        evaluate_run(tmp_path / "run")
