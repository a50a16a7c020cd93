"""Getting photos into the model: decoding + the eval transform, and captioning a folder of photos.

Generates 12-megapixel JPEGs (4032x3024, quality 90, photo-like: smooth colour fields plus grain) and
measures, interleaved, with the ratio the median over rounds:
  - transformers' BlipImageProcessor (its PIL backend; the user opens the files) against our
    EvalTransform on one thread and with `iter_images`' decoding threads (default count), images/s,
    and the largest pixel difference between the two libraries;
  - `model.caption(paths)` of the `base` model (random weights, 384 px, greedy, batches of 8) with
    decoding in the caller's thread (workers=0) against decoding threads ahead of the model.
On this 2-core CPU the model keeps both cores busy, so threads mostly help the first batch; on a GPU,
where the model is ~10x faster than one thread's JPEG decoding, they set the pace.
Writes benchmarks/results/image_pipeline.json (image_pipeline_cuda.json with --device cuda).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).parent))
from common import interleave, machine, median, paired_ratio, round_ratios, scratch_dir, write  # noqa: E402

import blip  # noqa: E402
from blip.transform import default_workers, iter_images  # noqa: E402


def photos(folder: Path, n: int, size=(4032, 3024)) -> list[str]:
    rng = np.random.default_rng(0)
    paths = []
    for i in range(n):
        field = Image.fromarray(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)).resize(size, Image.BICUBIC)
        grain = rng.integers(-12, 12, (size[1], size[0], 3), dtype=np.int16)
        pixels = np.clip(np.asarray(field).astype(np.int16) + grain, 0, 255).astype(np.uint8)
        paths.append(str(folder / f"photo{i:03d}.jpg"))
        Image.fromarray(pixels).save(paths[-1], quality=90)
    return paths


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="cpu", help="cpu or cuda (where the captioning model runs)")
    ap.add_argument("--no-caption", action="store_true", help="only the decoding part")
    args = ap.parse_args()
    from transformers import BlipImageProcessor

    paths = photos(scratch_dir(), args.images)
    workers = default_workers()
    processor = BlipImageProcessor(size={"height": 384, "width": 384})

    def hf():
        return processor([Image.open(p).convert("RGB") for p in paths], return_tensors="pt")["pixel_values"]

    def ours(w):
        return lambda: torch.stack([x for _, x in iter_images(paths, 384, workers=w)])

    max_diff = (hf() - ours(0)()).abs().max().item()
    t = interleave({"transformers": hf, "ours_1_thread": ours(0), "ours_threads": ours(workers)}, args.repeats)
    n = args.images
    result = {"machine": machine(args.device), "images": n, "photo_size": [4032, 3024], "threads": workers,
              "transformers_processor": type(processor).__name__,
              "decode": {"transformers_images_per_s": n / median(t["transformers"]),
                         "ours_1_thread_images_per_s": n / median(t["ours_1_thread"]),
                         "ours_threads_images_per_s": n / median(t["ours_threads"]),
                         "ours_1_thread_vs_transformers": paired_ratio(t["transformers"], t["ours_1_thread"]),
                         "ours_threads_vs_transformers": paired_ratio(t["transformers"], t["ours_threads"]),
                         "max_abs_pixel_difference": max_diff,
                         "round_ratios_threads": round_ratios(t["transformers"], t["ours_threads"])}}
    print("decode", result["decode"], file=sys.stderr)

    if not args.no_caption:
        model = blip.create_model("base", task="caption", device=args.device, **{"vision.image_size": 384})
        run = {w: (lambda w=w: model.caption(paths, batch_size=8, num_beams=1, workers=w)) for w in (0, workers)}
        same = run[0]() == run[workers]()
        c = interleave({"workers_0": run[0], "threads": run[workers]}, args.repeats)
        result["caption"] = {"mode": "greedy, batches of 8", "captions_identical": same,
                             "serial_images_per_s": n / median(c["workers_0"]),
                             "threads_images_per_s": n / median(c["threads"]),
                             "threads_speedup": paired_ratio(c["workers_0"], c["threads"]),
                             "round_ratios": round_ratios(c["workers_0"], c["threads"])}
        print("caption", result["caption"], file=sys.stderr)
    write("image_pipeline" if torch.device(args.device).type == "cpu" else "image_pipeline_cuda", result)


if __name__ == "__main__":
    main()
