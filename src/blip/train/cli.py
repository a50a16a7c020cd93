"""`blip pretrain`: registered on the main CLI with `add_cli(subparsers)`."""
from __future__ import annotations

import argparse
import json
import os
import sys


def cmd_pretrain(args) -> int:
    from . import distributed as dist
    from .config import TrainConfig, apply_overrides
    from .loop import Trainer, read_training_checkpoint

    if args.resume and not args.config:  # the run's own config, with overrides
        saved = read_training_checkpoint(args.resume)["train_config"]
        cfg = TrainConfig.from_dict(apply_overrides(saved, args.overrides))
    else:
        cfg = TrainConfig.load(args.config, args.overrides)
    if args.no_progress:
        cfg.progress = False
    try:
        out = args.out or (os.path.dirname(os.path.abspath(args.resume)) if args.resume else "runs/pretrain")
        trainer = Trainer(cfg, out, resume=args.resume)
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
    p.add_argument("--resume", help="checkpoint to continue from exactly (out/checkpoint.pt)")
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
