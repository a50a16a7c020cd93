"""What a model has learnt of the synthetic corpus: the targets of "the embedded default must learn".

    python benchmarks/synthetic_quality.py MODEL [--corpus runs/synthetic] [--k-test 16] [--json]

MODEL is anything `blip.load` reads (a folder `blip pretrain` exported, a retrieval or captioning
checkpoint: the probes its parts allow run). Prints the ITM one-attribute accuracy (target 90%), zero-shot
retrieval by ITC and with the ITM rerank, and the share of greedy captions that name the right colour and
shape (targets 80% of one-object images, 60% of two-object images' large object). See
blip/data/synth_quality.py for how each is scored.
"""
from __future__ import annotations

import argparse
import json
import sys
import time

import torch


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model")
    ap.add_argument("--corpus", default="runs/synthetic", help="folder `blip data synth` wrote")
    ap.add_argument("--k-test", type=int, default=16, help="ITM rerank depth (0: ITC only)")
    ap.add_argument("--limit", type=int, help="first N test images only")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--json", action="store_true", help="one JSON object")
    args = ap.parse_args(argv)
    import blip
    from blip.data.synth_quality import TARGETS, probe
    torch.manual_seed(0)
    t0 = time.perf_counter()
    try:
        model = blip.load(args.model, device=args.device)
        result = probe(model, args.corpus, k_test=args.k_test, limit=args.limit)
    except (OSError, ValueError) as e:
        print(f"synthetic_quality: error: {e}", file=sys.stderr)
        return 2
    result.update(model=str(args.model), seconds=round(time.perf_counter() - t0, 1), targets=TARGETS)
    if args.json:
        print(json.dumps(result))
        return 0
    for key, value in result.items():
        print(f"{key}: {value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
