"""`blip pretrain`: registered on the main CLI with `add_cli(subparsers)`."""
from __future__ import annotations

import argparse
import json
import os
import sys


def cmd_pretrain(args) -> int:
    from . import distributed as dist
    from .config import TrainConfig, apply_overrides
    from .loop import Trainer, newest_checkpoint, read_checkpoint

    resume, saved = args.resume, None
    if resume == "auto":
        out = args.out or "runs/pretrain"
        resume, saved = newest_checkpoint(out) or (None, None)
    else:
        out = args.out or (os.path.dirname(os.path.abspath(resume)) if resume else "runs/pretrain")
        if resume and not args.config:
            saved = read_checkpoint(resume)
    if saved and not args.config:  # the run's own config, with overrides
        cfg = TrainConfig.from_dict(apply_overrides(saved["train_config"], args.overrides))
    else:
        cfg = TrainConfig.load(args.config, args.overrides)
    del saved
    if args.no_progress:
        cfg.progress = False
    try:
        trainer = Trainer(cfg, out, resume=resume)
        result = trainer.train()
        if dist.is_main():
            print(json.dumps({"out": str(out), **result}))
    finally:
        dist.cleanup()
    return 0


def add_cli(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("pretrain", help="pretrain BLIP (ITC + ITM + LM); torchrun for several processes",
                              description="Train from a JSON config; key=value pairs override its fields "
                                          "(model.<dotted key>=value overrides the model preset).")
    p.add_argument("--config", "-c", help="training config (JSON), e.g. configs/pretrain_synthetic.json")
    p.add_argument("overrides", nargs="*", metavar="key=value")
    p.add_argument("--resume", help="checkpoint to continue from exactly (out/checkpoint.pt), or auto: the "
                                    "newest good one in --out (none there: start fresh)")
    p.add_argument("--out", "-o", help="folder for checkpoint.pt, log.jsonl and the final model/ "
                                        "(default: runs/pretrain, or the resumed checkpoint's folder)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_pretrain)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="blip")
    add_cli(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
