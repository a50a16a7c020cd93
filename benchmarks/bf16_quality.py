"""bf16 against fp32 on a trained model: share of identical captions (beam 3) and image-embedding
cosine over an official-format test split, for dtype="bf16" (the image encoder in bf16, the text side
fp32) and "bf16-full" (every weight). Target: >= 95% identical, cosine >= 0.999.

    python benchmarks/bf16_quality.py MODEL_DIR TEST_JSON [--limit 200]
Writes benchmarks/results/bf16_quality.json.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import machine, write  # noqa: E402

import blip  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("test_json")
    ap.add_argument("--limit", type=int, default=200)
    args = ap.parse_args()
    entries = json.loads(Path(args.test_json).read_text())[: args.limit]
    images = [str(Path(args.test_json).parent / e["image"]) for e in entries]
    fp32 = blip.load(args.model, task="caption")
    ref = fp32.caption(images, return_ids=True)
    pixels = fp32.pixels(images[:32])
    e32 = fp32.encode_image(pixels)[:, 0].float()
    result = {"machine": machine(), "model": args.model, "images": len(images)}
    for dtype in ("bf16", "bf16-full"):
        other = blip.load(args.model, task="caption", dtype=dtype)
        out = other.caption(images, return_ids=True)
        cos = torch.nn.functional.cosine_similarity(e32, other.encode_image(pixels)[:, 0].float(), dim=-1)
        result[dtype] = {"identical_captions_pct": 100.0 * sum(x["ids"] == y["ids"] for x, y in zip(ref, out)) / len(ref),
                         "image_cls_cosine_min": float(cos.min()),
                         "examples": [{"fp32": x["caption"], dtype: y["caption"]} for x, y in zip(ref[:2], out[:2])]}
    write("bf16_quality", result)


if __name__ == "__main__":
    main()
