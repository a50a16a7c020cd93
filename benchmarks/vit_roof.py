"""How close the image encoder runs to its matmul roof.

Times our ViT forward (`base`, 384 px, 8 images) against the same model's linear layers run alone as
plain matmuls on the same shapes (qkv, proj, fc1, fc2 per block, and the patch embedding as a
matmul), in fp32 and bf16, interleaved; the ratio is the median of the rounds' ratios (this VM's speed
drifts within minutes; bf16 rounds are ~1 s, so they get 3x the rounds). Target: forward <= 1.25x the matmuls alone.
Writes benchmarks/results/vit_roof.json (vit_roof_cuda.json with --device cuda).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import interleave, machine, median, paired_ratio, round_ratios, write  # noqa: E402

import blip  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=8)
    ap.add_argument("--image-size", type=int, default=384)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    args = ap.parse_args()
    dev = torch.device(args.device)
    result = {"machine": machine(args.device), "images": args.images, "image_size": args.image_size, "targets": {}}
    for dtype in (torch.float32, torch.bfloat16):
        model = blip.create_model("base", task="caption", device=dev, dtype=dtype,
                                  **{"vision.image_size": args.image_size})
        vit = model.visual_encoder
        px = torch.randn(args.images, 3, args.image_size, args.image_size, dtype=dtype, device=dev)
        n = 1 + (args.image_size // 16) ** 2
        rows = args.images * n
        w = vit.cfg.width
        x = torch.randn(rows, w, dtype=dtype, device=dev)
        h = torch.randn(rows, int(w * vit.cfg.mlp_ratio), dtype=dtype, device=dev)
        patches = torch.randn(args.images * (n - 1), 3 * 16 * 16, dtype=dtype, device=dev)
        pw = vit.patch_embed.proj.weight.reshape(w, -1)

        def forward():
            with torch.inference_mode():
                return vit(px)

        def matmuls():
            with torch.inference_mode():
                torch.nn.functional.linear(patches, pw)
                for b in vit.blocks:
                    torch.nn.functional.linear(x, b.attn.qkv.weight, b.attn.qkv.bias)
                    torch.nn.functional.linear(x, b.attn.proj.weight, b.attn.proj.bias)
                    torch.nn.functional.linear(x, b.mlp.fc1.weight, b.mlp.fc1.bias)
                    torch.nn.functional.linear(h, b.mlp.fc2.weight, b.mlp.fc2.bias)

        forward(), matmuls()  # warm up
        t = interleave({"forward": forward, "matmuls": matmuls}, args.repeats * (3 if dtype == torch.bfloat16 else 1))
        name = "fp32" if dtype == torch.float32 else "bf16"
        flops = 2 * rows * sum(p.numel() for p in vit.parameters() if p.ndim == 2)
        result["targets"][name] = {"forward_s": median(t["forward"]), "matmuls_s": median(t["matmuls"]),
                                   "ratio": paired_ratio(t["forward"], t["matmuls"]),
                                   "round_ratios": round_ratios(t["forward"], t["matmuls"]),
                                   "linear_gflops_per_s": flops / median(t["matmuls"]) / 1e9}
        print(name, result["targets"][name], file=sys.stderr)
    write("vit_roof" if dev.type == "cpu" else f"vit_roof_{dev.type}", result)


if __name__ == "__main__":
    main()
