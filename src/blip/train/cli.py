"""`blip pretrain` and `blip finetune`: registered on the main CLI with `add_cli(subparsers)`."""
from __future__ import annotations

import argparse
import json
import os
import sys


def cmd_pretrain(args) -> int:
    return _train(args, "pretrain", "runs/pretrain")


def cmd_finetune(args) -> int:
    return _train(args, args.task, f"runs/{args.task}")


def _train(args, task: str, default_out: str) -> int:
    from . import distributed as dist
    from .config import TrainConfig, apply_overrides
    from .loop import Trainer, newest_checkpoint, read_checkpoint

    resume, saved = args.resume, None
    if resume == "auto":
        out = args.out or default_out
        resume, saved = newest_checkpoint(out) or (None, None)
    else:
        out = args.out or (os.path.dirname(os.path.abspath(resume)) if resume else default_out)
        if resume and not args.config:
            saved = read_checkpoint(resume)
    overrides = list(args.overrides)
    if task != "pretrain":
        overrides.append(f"task={task}")
        if args.init:
            overrides.append(f"init={args.init}")
    if saved and not args.config:  # the run's own config, with overrides
        cfg = TrainConfig.from_dict(apply_overrides(saved["train_config"], overrides))
    else:
        cfg = TrainConfig.load(args.config, overrides)
    if cfg.task != task:
        raise ValueError(f"the config trains task {cfg.task!r}: use blip "
                         f"{'pretrain' if cfg.task == 'pretrain' else 'finetune --task ' + cfg.task}")
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

    from .tasks import TASKS
    f = subparsers.add_parser("finetune", help="finetune for captioning, retrieval, VQA or NLVR2; torchrun for several "
                                               "processes",
                              description="Finetune from a JSON config (configs/<task>_*.json); key=value pairs override "
                                          "its fields. Every epoch ends with the task's validation metric on "
                                          "val_file; the best epoch's model is exported to OUT/model (best.json says "
                                          "which and why).")
    f.add_argument("--task", "-t", required=True, choices=[t for t in TASKS if t != "pretrain"])
    f.add_argument("--config", "-c", help="training config (JSON), e.g. configs/caption_synthetic.json")
    f.add_argument("overrides", nargs="*", metavar="key=value")
    f.add_argument("--init", help="checkpoint to start from: anything blip.load takes (official name such as "
                                  "model_base_capfilt_large, .pth, Hugging Face folder or hub id, our folder)")
    f.add_argument("--resume", help="checkpoint to continue from exactly (out/checkpoint.pt), or auto")
    f.add_argument("--out", "-o", help="output folder (default: runs/<task>)")
    f.add_argument("--no-progress", action="store_true", help="no progress bar")
    f.set_defaults(func=cmd_finetune)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="blip")
    add_cli(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
