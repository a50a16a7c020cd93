"""`blip reproduce`: registered on the main CLI with `add_cli(subparsers)`."""
from __future__ import annotations

import json
from pathlib import Path


def cmd_reproduce(args) -> int:
    from .pipeline import ROWS, Options, Pipeline
    corpus = Path(args.corpus)
    if args.corpus == "runs/synthetic" and not (corpus / "metadata.json").exists():
        from ..data.synth import generate_corpus
        print(f"blip reproduce: generating the synthetic corpus in {corpus}", flush=True)
        generate_corpus(corpus, seed=0)
    rows = tuple(args.rows.split(",")) if args.rows else (("none", "capfilt") if args.quick else tuple(ROWS))
    opts = Options(corpus=corpus, out=Path(args.out), rows=rows, quick=args.quick, force=args.force, seed=args.seed,
                   pretrain_overrides=list(args.overrides), device=args.device, progress=not args.no_progress,
                   web_limit=args.web_limit if args.web_limit is not None else (1000 if args.quick else None))
    report = Pipeline(opts).run()
    print(json.dumps({"out": str(args.out), "rows": [{"name": r["name"], "tr@1": r["retrieval"].get("tr@1"),
                                                      "ir@1": r["retrieval"].get("ir@1"),
                                                      "cider": r["caption"].get("cider")} for r in report["rows"]],
                      "filter_auc": report.get("filter", {}).get("auc"), "minutes": report["minutes"]}))
    print(f"blip reproduce: report in {Path(args.out) / 'report.html'}")
    _print_pretraining_targets(report, Path(args.out))
    return 0


def _print_pretraining_targets(report: dict, out: Path) -> None:
    """What the first pretraining learnt, against the targets of the embedded default (our corpus only)."""
    probe = report.get("pretrained")
    if not probe:
        return
    from ..demo import itm_loss_and_prior, print_targets, targets
    from ..train.plots import read_log
    log = out / "pretrain_none" / "log.jsonl"
    loss, prior = itm_loss_and_prior(read_log(log)) if log.exists() else (None, None)
    print("blip reproduce: the first pretraining against the embedded default's targets "
          f"(loss curves in {out / 'report.html'}):")
    print_targets(targets(probe, report["minutes"].get("pretrain_none"), loss, prior), probe, indent="  ")
    cap = report.get("captioner", {}).get("attribute_accuracy")
    flt = report.get("filter", {}).get("auc")
    if flt is not None:
        print(f"  filter AUC against the noise labels {flt:.3f} (target 0.95)")
    if cap is not None:
        print(f"  captioner names the main object's colour and shape in {cap:.1f}% of web images (target 80)")
    total = report["minutes"].get("total")
    if total is not None:
        print(f"  pipeline minutes {total:.1f} (make demo target 20 with the venv)")


def add_cli(subparsers):
    from .pipeline import ROWS
    p = subparsers.add_parser("reproduce", help="the paper's pipeline end to end: pretrain, finetune a captioner and "
                                                "a filter, bootstrap (CapFilt), pretrain again, compare",
                              description="On the embedded synthetic corpus (default; generated when missing) or a "
                                          "folder with pretrain.json, clean_train.json and test.json. Every stage's "
                                          "outputs are reused when present.")
    p.add_argument("--corpus", default="runs/synthetic")
    p.add_argument("--out", "-o", default="runs/reproduce")
    p.add_argument("--quick", action="store_true", help="a few steps per stage, 1000 web pairs, rows none and capfilt")
    p.add_argument("--rows", help=f"comma-separated Table-1 rows among {','.join(ROWS)} (default: all; --quick: "
                                  "none,capfilt)")
    p.add_argument("--force", action="store_true", help="redo every stage")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--web-limit", type=int, help="use the first N web pairs only")
    p.add_argument("--device")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="pretraining config overrides")
    p.set_defaults(func=cmd_reproduce)
    return p
