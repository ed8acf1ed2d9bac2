"""Validation loss per domain: a two-level-RRE run, its extracted sub-models, a baseline.

    python scripts/sigma_report.py runs/tiny-sigma runs/tiny-sigma-moge [--batches 16]

Sub-models are read from the full run's siblings RUN-<domain> (written by
`moge extract RUN --domain <domain> RUN-<domain>`). Every number is measured here, in
this run of the script, on each domain's fixed validation windows (float32, eval mode);
the table is printed as Markdown.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from moge.model import count_parameters, format_params
from moge.sigma.data import check_dataset_domains
from moge.sigma.report import domain_val_loss
from moge.training.checkpoint import load_run
from moge.training.data import load_dataset


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("full", type=Path, help="run folder of the two-level-RRE model")
    parser.add_argument(
        "baseline", type=Path, help="run folder of the same-size model trained on all domains"
    )
    parser.add_argument("--batches", type=int, default=16, help="val batches per domain (default 16)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    full, cfg, step = load_run(args.full)
    base, base_cfg, base_step = load_run(args.baseline)
    ds = load_dataset(cfg.data)
    check_dataset_domains(ds, cfg.moe)  # the folder's domains (subfolders) are still the run's
    B = cfg.eval.batch_size
    n_full = count_parameters(cfg.model, cfg.moe).total
    n_base = count_parameters(base_cfg.model, base_cfg.moe)
    print(f"full: {args.full} @ step {step}, {format_params(n_full)} parameters; baseline: {args.baseline} "
          f"@ step {base_step}, {format_params(n_base.total)} ({format_params(n_base.activated)} activated); "
          f"{args.batches} batches of {B} x {cfg.data.seq_len} per domain\n")  # fmt: skip
    print("| domain | sub-model params (saving) | full model | sub-model | equal | MoGE baseline |")
    print("|---|---:|---:|---:|:---:|---:|")
    rows = []
    for name in ds.domains:
        sub_dir = args.full.parent / f"{args.full.name}-{name}"
        if not sub_dir.is_dir():
            print(f"error: {sub_dir} not found; run `moge extract {args.full} --domain {name} {sub_dir}`",
                  file=sys.stderr)  # fmt: skip
            return 2
        sub, sub_cfg, _ = load_run(sub_dir)
        sub_ds = load_dataset(sub_cfg.data)  # that domain alone: the same val windows
        n_sub = count_parameters(sub_cfg.model, sub_cfg.moe).total
        loss_full = domain_val_loss(full, ds, name, B, args.batches)
        loss_sub = domain_val_loss(sub, sub_ds, name, B, args.batches)
        loss_base = domain_val_loss(base, ds, name, B, args.batches)
        rows.append((loss_full, loss_sub, loss_base))
        print(f"| {name} | {format_params(n_sub)} ({1 - n_sub / n_full:.0%}) | {loss_full:.4f} | {loss_sub:.4f} | "
              f"{'yes' if loss_full == loss_sub else 'NO'} | {loss_base:.4f} |")  # fmt: skip
    mean = [sum(r[i] for r in rows) / len(rows) for i in range(3)]
    print(f"| mean of domains | | {mean[0]:.4f} | {mean[1]:.4f} | | {mean[2]:.4f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
