"""Matching K texts against one image: one image-encoder pass plus K text passes.

Times `model.match(image, K texts)` (ITM + ITC) against the sum of its parts measured alone (the
ViT pass, the unimodal text pass, the multimodal pass with the image keys/values computed once),
and against transformers' BlipForImageTextRetrieval on the same random `base` weights (which needs
the image repeated per text for ITM). Target: within 1.2x of the parts. Writes
benchmarks/results/match_speed.json.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import interleave, machine, median, scratch_dir, write  # noqa: E402

import blip  # noqa: E402
from blip.tokenizer import ENC_ID  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--texts", type=int, default=16)
    ap.add_argument("--image-size", type=int, default=384)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    from transformers import BlipConfig, BlipForImageTextRetrieval
    torch.manual_seed(0)
    cfg = BlipConfig(text_config=dict(num_attention_heads=12),
                     vision_config=dict(image_size=args.image_size, layer_norm_eps=1e-6, initializer_range=0.02))
    hf = BlipForImageTextRetrieval(cfg).eval()
    folder = scratch_dir()
    hf.save_pretrained(folder)
    ours = blip.load(folder, device="cpu")
    px = torch.randn(1, 3, args.image_size, args.image_size)
    texts = [f"a photo of {i} dogs playing with a red ball on the beach" for i in range(args.texts)]
    ids, mask = ours._texts(texts, 35, None)
    enc_ids = ids.clone()
    enc_ids[:, 0] = ENC_ID

    def match():
        return ours.match(px, texts)

    def parts():
        with torch.inference_mode():
            states = ours.visual_encoder(px)
            ours.text_encoder(ids, mask, mode="text")
            ours.text_encoder(enc_ids, mask, states, mode="multimodal")

    def hf_match():
        with torch.inference_mode():
            hf(input_ids=enc_ids, pixel_values=px.expand(args.texts, -1, -1, -1), attention_mask=mask)
            hf(input_ids=ids, pixel_values=px, attention_mask=mask, use_itm_head=False)

    match(), parts()
    t = interleave({"match": match, "parts": parts, "transformers": hf_match}, args.repeats)
    m, p, h = median(t["match"]), median(t["parts"]), median(t["transformers"])
    write("match_speed", {"machine": machine(), "texts": args.texts, "image_size": args.image_size,
                          "match_s": m, "parts_s": p, "transformers_s": h, "match_over_parts": m / p,
                          "ours_pairs_per_s": args.texts / m, "transformers_pairs_per_s": args.texts / h,
                          "speedup_vs_transformers": h / m})


if __name__ == "__main__":
    main()
