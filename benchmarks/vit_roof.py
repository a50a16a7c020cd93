"""How close the image encoder runs to its matmul roof.

Times our ViT forward (`base`, 384 px, 8 images) against the same model's linear layers run alone as
plain matmuls on the same shapes (qkv, proj, fc1, fc2 per block, and the patch embedding as a
matmul, each with its bias, written into preallocated outputs so that no page faults are counted in
the roof), in fp32 and bf16, interleaved; the ratio is the median of the rounds' ratios (this VM's
speed drifts within minutes; bf16 rounds are ~1 s, so they get 3x the rounds). Target: forward
<= 1.25x the matmuls alone.
Writes benchmarks/results/vit_roof.json.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import interleave, machine, median, write  # noqa: E402

import blip  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=8)
    ap.add_argument("--image-size", type=int, default=384)
    ap.add_argument("--repeats", type=int, default=7)
    args = ap.parse_args()
    result = {"machine": machine(), "images": args.images, "image_size": args.image_size, "targets": {}}
    for dtype in (torch.float32, torch.bfloat16):
        model = blip.create_model("base", task="caption", dtype=dtype, **{"vision.image_size": args.image_size})
        vit = model.visual_encoder
        px = torch.randn(args.images, 3, args.image_size, args.image_size, dtype=dtype)
        n = 1 + (args.image_size // 16) ** 2
        rows = args.images * n
        w = vit.cfg.width
        x = torch.randn(rows, w, dtype=dtype)
        h = torch.randn(rows, int(w * vit.cfg.mlp_ratio), dtype=dtype)
        patches = torch.randn(args.images * (n - 1), 3 * 16 * 16, dtype=dtype)
        pw = vit.patch_embed.proj.weight.reshape(w, -1)
        layers = [(x, layer) for b in vit.blocks for layer in (b.attn.qkv, b.attn.proj, b.mlp.fc1)]
        layers += [(h, b.mlp.fc2) for b in vit.blocks]
        outs = {n: torch.empty(rows, n, dtype=dtype) for n in {layer.out_features for _, layer in layers}}
        patch_out = torch.empty(patches.shape[0], w, dtype=dtype)

        def forward():
            with torch.inference_mode():
                return vit(px)

        def matmuls():
            with torch.inference_mode():
                torch.addmm(vit.patch_embed.proj.bias, patches, pw.t(), out=patch_out)
                for inp, layer in layers:
                    torch.addmm(layer.bias, inp, layer.weight.t(), out=outs[layer.out_features])

        forward(), matmuls()  # warm up
        t = interleave({"forward": forward, "matmuls": matmuls},
                       args.repeats * (3 if dtype == torch.bfloat16 else 1))
        name = "fp32" if dtype == torch.float32 else "bf16"
        flops = 2 * rows * sum(p.numel() for p in vit.parameters() if p.ndim == 2)
        paired = [f / m for f, m in zip(t["forward"], t["matmuls"])]  # each round's ratio: robust to drift
        result["targets"][name] = {"forward_s": median(t["forward"]), "matmuls_s": median(t["matmuls"]),
                                   "ratio": median(paired), "ratio_of_fastest": min(t["forward"]) / min(t["matmuls"]),
                                   "round_ratios": [round(r, 3) for r in paired],
                                   "linear_gflops_per_s": flops / median(t["matmuls"]) / 1e9}
        print(name, result["targets"][name], file=sys.stderr)
    write("vit_roof", result)


if __name__ == "__main__":
    main()
