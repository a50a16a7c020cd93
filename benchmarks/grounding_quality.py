"""Does the grounding heat map point at the object the text names? A pointing game on the synthetic corpus.

    python benchmarks/grounding_quality.py MODEL [--corpus runs/synthetic] [--limit N] [--method M] [--block B] [--json]

For every test image with two or more objects, each object is named by its colour and shape ("a red
circle"); a hit is the peak of the heat map (upsampled to the image, as `blip ground` draws it) falling
inside that object's box (centre +- radius, from the scene in metadata.json). Reported for the whole-text
map and for the shape word's map, next to chance (the box's share of the image) and the rate at which the
peak lands on another object of the scene instead. MODEL is anything `blip.load` reads with an ITM head
(a preset name gives random weights, to check that the script runs). --method: blip.grounding's "auto"
(default), "gradcam" or "saliency"; "all" scores each in turn.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch


def _box(o: dict) -> tuple[int, int, int, int]:
    return o["x"] - o["r"], o["y"] - o["r"], o["x"] + o["r"], o["y"] + o["r"]


def _inside(point: tuple[int, int], box) -> bool:
    x, y = point
    return box[0] <= x <= box[2] and box[1] <= y <= box[3]


def _peak_pixel(heat: torch.Tensor, size: tuple[int, int]) -> tuple[int, int]:
    """(x, y) of the largest value of the map upsampled to (width, height)."""
    from blip.grounding import upsample
    w, h = size
    i = int(upsample(heat, (h, w)).flatten().argmax())
    return i % w, i // w


def evaluate(model, corpus: str, limit: int | None = None, block: int | None = None, method: str = "auto") -> dict:
    from PIL import Image
    from blip.grounding import gradcam
    root = Path(corpus)
    meta_path = root / "metadata.json"
    if not meta_path.is_file():
        raise OSError(f"{meta_path} not found: give the folder `blip data synth` wrote")
    meta = json.loads(meta_path.read_text())
    if "test" not in meta:
        raise ValueError(f"{meta_path} has no 'test' key")
    entries = [e for e in meta["test"] if len(e["scene"]["objects"]) >= 2][:limit]
    hits = {"text": 0, "shape": 0}
    other = {"text": 0, "shape": 0}
    chance, n = 0.0, 0
    for e in entries:
        image = Image.open(root / e["image"]).convert("RGB")
        area = image.width * image.height
        objects = e["scene"]["objects"]
        for k, o in enumerate(objects):
            res = gradcam(model, image, f"a {o['color']} {o['shape']}", block=block, method=method)
            words = res["words"]
            shape_map = res["word_maps"][words.index(o["shape"])] if o["shape"] in words else res["text_map"]
            x0, y0, x1, y1 = _box(o)
            chance += (min(x1, image.width - 1) - max(x0, 0) + 1) * (min(y1, image.height - 1) - max(y0, 0) + 1) / area
            for name, heat in (("text", res["text_map"]), ("shape", shape_map)):
                p = _peak_pixel(heat, image.size)
                hits[name] += _inside(p, _box(o))
                other[name] += any(_inside(p, _box(q)) for j, q in enumerate(objects) if j != k)
            n += 1
    if n == 0:
        raise ValueError(f"no test image with two or more objects in {meta_path}")
    return {"queries": n, "images": len(entries), "method": res["method"], "block": res["block"],
            "pointing_text": hits["text"] / n, "pointing_shape_word": hits["shape"] / n,
            "on_other_object_text": other["text"] / n, "on_other_object_shape_word": other["shape"] / n,
            "chance": chance / n}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model")
    ap.add_argument("--corpus", default="runs/synthetic", help="folder `blip data synth` wrote")
    ap.add_argument("--limit", type=int, help="first N two-object test images only")
    from blip.grounding import METHODS
    ap.add_argument("--method", default="auto", choices=[*METHODS, "all"])
    ap.add_argument("--block", type=int, help="gradcam: text encoder layer (default: depth // 2)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--json", action="store_true", help="one JSON object")
    args = ap.parse_args(argv)
    import blip
    from blip.config import PRESETS
    torch.manual_seed(0)
    t0 = time.perf_counter()
    try:
        if args.model in PRESETS:
            print(f"grounding_quality: warning: '{args.model}' is a preset: random weights", file=sys.stderr)
            model = blip.create_model(args.model, task="retrieval", device=args.device)
        else:
            model = blip.load(args.model, device=args.device)
        methods = [m for m in METHODS if m != "auto"] if args.method == "all" else [args.method]
        results = [evaluate(model.eval(), args.corpus, limit=args.limit, block=args.block, method=m) for m in methods]
    except (OSError, ValueError) as e:
        print(f"grounding_quality: error: {e}", file=sys.stderr)
        return 2
    result = results[0] if len(results) == 1 else {"by_method": {r["method"]: r for r in results}}
    result.update(model=str(args.model), seconds=round(time.perf_counter() - t0, 1))
    if args.json:
        print(json.dumps(result))
        return 0
    for r in results:
        for key, value in r.items():
            print(f"{key}: {value:.3f}" if isinstance(value, float) else f"{key}: {value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
