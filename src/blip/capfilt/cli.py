"""`blip capfilt`: registered on the main CLI with `add_cli(subparsers)`."""
from __future__ import annotations

import argparse
import json
import sys

from ..factory import DTYPE_NAMES


def cmd_capfilt(args) -> int:
    from .pipeline import bootstrap
    data = args.data[0] if len(args.data) == 1 else args.data
    options = dict(num_captions=args.num_captions, num_beams=args.beam, top_p=args.top_p, top_k=args.top_k,
                   repetition_penalty=args.repetition_penalty, max_length=args.max_length,
                   min_length=args.min_length, prompt=args.prompt, threshold=args.threshold, seed=args.seed,
                   batch_size=args.batch_size, part_size=args.part_size, image_root=args.image_root,
                   device=args.device, dtype=args.dtype, workers=args.workers, progress=not args.quiet,
                   force=args.force)
    result = bootstrap(args.captioner, args.filter, data, args.out, **options)
    if "rank" in result:  # another rank's share is done; rank 0 assembles and reports
        return 0
    if args.json:
        print(json.dumps(result))
    else:
        t = result["texts"]
        line = (f"{result['images']} images: kept {t['web']['kept']}/{t['web']['total']} web and "
                f"{t['synthetic']['kept']}/{t['synthetic']['total']} synthetic texts -> "
                f"{result['bootstrapped_pairs']} pairs in {args.out}")
        if "noise" in result:
            n = result["noise"]
            ratio = lambda x: "n/a" if x is None else f"{100 * x:.1f}%"  # noqa: E731
            line += f" (labelled web noise {ratio(n['noise_ratio_before'])} -> {ratio(n['noise_ratio_after'])})"
        print(line)
    if result["unreadable_images"]:
        print(f"blip: {result['unreadable_images']} of {result['items']} images unreadable, skipped", file=sys.stderr)
    return 0


def _positive(kind):
    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
        if value <= 0:
            raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
        return value
    return parse


def add_cli(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "capfilt", help="bootstrap a web corpus: synthetic captions + ITM filtering (CapFilt)",
        description="Caption every web image (nucleus sampling, seeded per image), score the web and synthetic "
                    "texts with the filter's ITM head, keep those with P(match) >= --threshold. Writes "
                    "OUT/bootstrapped.json, OUT/shards/, OUT/audit.parquet, OUT/summary.json. Killed, the same "
                    "command continues where it stopped; under torchrun the ranks share the parts.")
    p.add_argument("--captioner", required=True, help="checkpoint with a captioning decoder (caption or pretrain)")
    p.add_argument("--filter", required=True,
                   help="checkpoint with ITM head and ITC projections (retrieval or pretrain)")
    p.add_argument("--data", required=True, nargs="+",
                   help="JSON list [{image, caption, noise?}], or webdataset shards (folder, glob, {a..b} "
                        "range, files)")
    p.add_argument("--out", "-o", required=True, help="output folder (a rerun continues the run there)")
    p.add_argument("--image-root", help="folder JSON image paths are relative to (default: the JSON's folder)")
    p.add_argument("--num-captions", type=_positive(int), default=1, help="synthetic captions per image (1)")
    p.add_argument("--beam", type=int, default=0, metavar="N",
                   help="beam search with N beams instead of nucleus sampling (the paper found it worse)")
    p.add_argument("--top-p", type=float, default=0.9)
    p.add_argument("--top-k", type=int, default=50, help="top-k before top-p, as transformers 4.15 (0: off)")
    p.add_argument("--repetition-penalty", type=float, help="default 1.1 when sampling (official), 1.0 for beams")
    p.add_argument("--max-length", type=int, default=20, help="max tokens, prompt included")
    p.add_argument("--min-length", type=int, default=5, help="min tokens, prompt included")
    p.add_argument("--prompt", help="decoder prompt (default: the captioner's, 'a picture of ')")
    p.add_argument("--threshold", type=float, default=0.5, help="keep a text when ITM P(match) >= this (0.5)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=_positive(int), default=16)
    p.add_argument("--part-size", type=_positive(int), default=1000,
                   help="JSON items per part, the unit of resumption (a shard is one part)")
    p.add_argument("--workers", type=int, help="threads decoding images (default: up to 8; 0: none)")
    p.add_argument("--device", help="cpu, cuda, cuda:1 (default: cuda if available; torchrun: cuda:LOCAL_RANK)")
    p.add_argument("--dtype", choices=DTYPE_NAMES, help="default bf16 on CUDA (image encoders bf16, text fp32), "
                                                        "fp32 on the CPU")
    p.add_argument("--force", action="store_true", help="start over when OUT holds a run with other arguments")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_capfilt)
    return p
