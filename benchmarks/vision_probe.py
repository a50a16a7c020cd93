"""Can a vision tower from scratch learn the synthetic corpus's shapes and colours in a few hundred steps?

Supervised, no text: the mini preset's ViT (token 0 -> one linear layer) is trained to say which of the 7
shapes and 11 colours a training image holds (binary cross-entropy), on the corpus's 4500 training images
(web + clean less 800 held out, ground truth from metadata.json), batch 64, AdamW lr 1e-3 (30 warmup steps),
bf16 autocast; then, on the one-object images of the test split and the held-out ones, whether its top shape
and top colour are the object's. Variants:
the official patch stem and [CLS] token, the convolutional stem (vision.stem="conv") or both summed
(vision.stem="patch_conv"), max pooling into
token 0 after the final LayerNorm (vision.pool="max") or before it (vision.pool="max_prenorm"), and as a
reference a plain 4-layer CNN with global max pooling.
With --readout attn the head is one learned query cross-attending to all of the tower's tokens (as the text
side reads an image) instead of a linear layer on token 0. With --whiten the conv stems' first convolution
starts as the whitening of the first 256 training images' 3x3 patches (TrainConfig.whiten_stem).
Writes benchmarks/results/vision_probe.json (_seeds with several --seeds, _attn with --readout attn, _whiten,
_lrX / _bN when --lr / --batch are not 1e-3 / 64).

    python benchmarks/vision_probe.py [--corpus runs/synthetic] [--steps 300] [--variants patch,conv_max,...] [--seeds 0,1]
                                      [--readout token0|attn] [--whiten] [--lr 1e-3] [--batch 64]
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))
from common import machine, write  # noqa: E402


def _tower(stem: str, pool: str, **more) -> dict:
    return {"vision.stem": stem, "vision.pool": pool, **more}


VARIANTS = {"patch": _tower("patch", "cls"), "patch_max": _tower("patch", "max"),
            "patch_max_prenorm": _tower("patch", "max_prenorm"), "conv": _tower("conv", "cls"),
            "conv_max": _tower("conv", "max"), "conv_max_prenorm": _tower("conv", "max_prenorm"),
            "patch_conv_max": _tower("patch_conv", "max"),
            # no transformer blocks: the conv stem's tokens (+ positions, LayerNorm) are the image tokens
            "conv_depth0_max_prenorm": _tower("conv", "max_prenorm", **{"vision.depth": 0}),
            # the same, every patch token plus token 0 (vision.global_context): for --readout attn
            "conv_depth0_ctx": _tower("conv", "max_prenorm", **{"vision.depth": 0, "vision.global_context": True}),
            # 4-pixel patches: a 64-pixel image as 16 x 16 tokens, 4x the tokens of the mini preset's 8 x 8
            "patch4": _tower("patch", "cls", **{"vision.patch_size": 4}),
            "patch4_max": _tower("patch", "max", **{"vision.patch_size": 4}),
            "cnn": None}


class CNN(nn.Module):
    """Reference: four 3x3 conv + BatchNorm + ReLU layers (three 2x2 max pools), global max pooling."""

    def __init__(self, width: int = 192):
        super().__init__()
        layers, c = [], 3
        for i, out in enumerate((32, 64, 128, width)):
            layers += [nn.Conv2d(c, out, 3, 1, 1), nn.BatchNorm2d(out), nn.ReLU()] + ([nn.MaxPool2d(2)] if i < 3 else [])
            c = out
        self.f = nn.Sequential(*layers)

    def forward(self, x):
        return self.f(x).amax((2, 3)).unsqueeze(1)


def load(corpus: Path, items: list[dict], size: int, shapes, colors):
    from blip.transform import normalize
    xs, ys = [], []
    for it in items:
        im = Image.open(corpus / it["image"]).convert("RGB").resize((size, size), Image.BICUBIC)
        xs.append(torch.from_numpy(np.array(im)).permute(2, 0, 1).float() / 255)
        y = torch.zeros(len(shapes) + len(colors))
        for o in it["scene"]["objects"]:
            y[shapes.index(o["shape"])] = 1
            y[len(shapes) + colors.index(o["color"])] = 1
        ys.append(y)
    return normalize(torch.stack(xs)), torch.stack(ys)


class AttnReadout(nn.Module):
    def __init__(self, width, n_out, heads=3):
        super().__init__()
        self.q = nn.Parameter(torch.randn(1, 1, width) * 0.02)
        self.attn = nn.MultiheadAttention(width, heads, batch_first=True)
        self.out = nn.Linear(width, n_out)

    def forward(self, x):
        return self.out(self.attn(self.q.expand(x.shape[0], -1, -1), x, x)[0][:, 0])


def _read(tokens, readout):
    return tokens if readout == "attn" else tokens[:, 0]


def run(variant: str, data, steps: int, size: int, n_shapes: int, seed: int = 0, readout: str = "token0",
        lr: float = 1e-3, batch: int = 64, whiten: bool = False) -> dict:
    import blip
    from blip.train.init_weights import clip_init
    torch.manual_seed(seed)
    if VARIANTS[variant] is None:
        tower, width = CNN(), 192
    else:
        model = blip.create_model("mini", task="feature", device="cpu", **{"vision.image_size": size, **VARIANTS[variant]})
        clip_init(model)  # the synthetic pretraining's init
        tower, width = model.visual_encoder, model.config.vision.width
    (xtr, ytr), (xte, yte, single) = data
    if whiten:  # TrainConfig.whiten_stem: the first convolution whitens the first 256 training images' patches
        from blip.train.init_weights import whiten_stem
        whiten_stem(tower, xtr[:256])
    # attn: one learned query cross-attending to every image token (as the text side reads them)
    head = AttnReadout(width, ytr.shape[1]) if readout == "attn" else nn.Linear(width, ytr.shape[1])
    params = list(tower.parameters()) + list(head.parameters())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.05)
    g = torch.Generator().manual_seed(seed)
    curve, t0 = [], time.perf_counter()
    for step in range(1, steps + 1):
        for group in opt.param_groups:
            group["lr"] = lr * min(1.0, step / 30)
        idx = torch.randint(0, len(xtr), (batch,), generator=g)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            z = head(_read(tower(xtr[idx]), readout)).float()
        F.binary_cross_entropy_with_logits(z, ytr[idx]).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if step % 50 == 0 or step == steps:
            tower.eval()
            with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
                z = head(_read(tower(xte), readout)).float()
            tower.train()
            shape = (z[:, :n_shapes].argmax(1) == yte[:, :n_shapes].argmax(1))[single].float().mean().item()
            color = (z[:, n_shapes:].argmax(1) == yte[:, n_shapes:].argmax(1))[single].float().mean().item()
            curve.append({"step": step, "shape": round(100 * shape, 1), "color": round(100 * color, 1)})
            print(variant, curve[-1], file=sys.stderr)
    return {"curve": curve, "seconds": round(time.perf_counter() - t0, 1),
            "shape_last": curve[-1]["shape"], "color_last": curve[-1]["color"]}


def main() -> None:
    from blip.data.synth import COLORS, SHAPES
    ap = argparse.ArgumentParser()
    ap.add_argument("--corpus", default="runs/synthetic")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--held-out", type=int, default=800)
    ap.add_argument("--seeds", default="0", help="comma-separated init/data-order seeds; each variant runs once per seed")
    ap.add_argument("--variants", default=",".join(v for v in VARIANTS if v != "conv_depth0_ctx"))
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--whiten", action="store_true", help="conv stems: whiten_stem's first-layer init")
    ap.add_argument("--readout", default="token0", choices=["token0", "attn"],
                    help="token0: a linear layer on token 0; attn: one learned query cross-attending to all tokens")
    args = ap.parse_args()
    corpus = Path(args.corpus)
    meta = json.loads((corpus / "metadata.json").read_text())
    shapes, colors = list(SHAPES), list(COLORS)
    items = meta["pretrain"] + meta["clean"]
    # scored on the one-object images of the test split and of the held-out training images: the test
    # split alone has too few for a shape figure to be stable between runs
    held = meta["test"] + items[-args.held_out:]
    train = load(corpus, items[:-args.held_out], args.size, shapes, colors)
    xte, yte = load(corpus, held, args.size, shapes, colors)
    single = torch.tensor([len(t["scene"]["objects"]) == 1 for t in held])
    result = {"machine": machine(), "steps": args.steps, "image_size": args.size, "train_images": len(train[0]),
              "one_object_scored_images": int(single.sum()), "chance": {"shape": round(100 / len(shapes), 1),
                                                                      "color": round(100 / len(colors), 1)},
              "variants": {}}
    seeds = [int(x) for x in args.seeds.split(",")]
    for v in args.variants.split(","):
        for seed in seeds:
            name = v if len(seeds) == 1 else f"{v}/seed{seed}"
            result["variants"][name + ("" if args.readout == "token0" else "/" + args.readout)] = run(
                v, (train, (xte, yte, single)), args.steps, args.size, len(shapes), seed, args.readout, args.lr, args.batch,
                args.whiten and VARIANTS[v] is not None and VARIANTS[v]["vision.stem"] != "patch")
    result["readout"] = args.readout
    name = "vision_probe" + ("" if len(seeds) == 1 else "_seeds") + ("" if args.readout == "token0" else "_attn")
    name += ("" if args.lr == 1e-3 else f"_lr{args.lr:g}") + ("" if args.batch == 64 else f"_b{args.batch}") \
        + ("_whiten" if args.whiten else "")
    result["lr"], result["batch"], result["whiten"] = args.lr, args.batch, args.whiten
    write(name, result)


if __name__ == "__main__":
    main()
