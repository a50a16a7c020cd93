"""`make demo`: a short real job on this machine with nothing downloaded.

Builds the `small` model, captions a few generated images with beam search and nucleus sampling,
scores image-text matches, and prints timings. The weights are random (no pretrained weights can be
fetched offline), so the point is the machinery and its speed, not the words.
"""
from __future__ import annotations

import time

import numpy as np
import torch
from PIL import Image, ImageDraw

import blip


def scenes(n: int, size: int = 256, seed: int = 0) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        img = Image.new("RGB", (size, size), tuple(int(c) for c in rng.integers(0, 255, 3)))
        draw = ImageDraw.Draw(img)
        for _ in range(int(rng.integers(1, 4))):
            (x, y), r = (int(v) for v in rng.integers(30, size - 30, 2)), int(rng.integers(10, 40))
            box = (x - r, y - r, x + r, y + r)
            colour = tuple(int(c) for c in rng.integers(0, 255, 3))
            (draw.ellipse if rng.random() < 0.5 else draw.rectangle)(box, fill=colour)
        out.append(img)
    return out


def main() -> None:
    torch.manual_seed(0)
    t0 = time.perf_counter()
    model = blip.create_model("small", task="pretrain")
    n_params = sum(p.numel() for p in model.parameters())
    print(f"built 'small' BLIP ({n_params / 1e6:.1f}M parameters) in {time.perf_counter() - t0:.2f}s")
    images = scenes(4)
    for name, kw in (("beam-3", dict(num_beams=3)), ("greedy", dict(num_beams=1)),
                     ("nucleus", dict(sample=True, top_p=0.9, generator=torch.Generator().manual_seed(0)))):
        t0 = time.perf_counter()
        caps = model.caption(images, max_length=20, min_length=5, **kw)
        dt = time.perf_counter() - t0
        print(f"{name:8s} {len(images) / dt:6.2f} images/s   first: {caps[0]!r}")
    t0 = time.perf_counter()
    scores = model.match(images[:1], ["a red circle", "a blue square on a green background", "a dog"])
    print(f"match    {3 / (time.perf_counter() - t0):6.2f} pairs/s    ITM {[round(float(s), 3) for s in scores['itm']]}")
    print("random weights: train with `blip pretrain` or load released ones with blip.load(...)")


if __name__ == "__main__":
    main()
