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
    return 0


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
