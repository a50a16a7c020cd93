"""Retrieval evaluation (blip.eval.retrieval.retrieval_scores) against the sum of its parts.

The parts, each measured alone on the same data: one ViT pass per image (+ projection), one unimodal
text pass per text (+ projection), and the ITM rerank's multimodal passes: for every image, its wanted
texts (its top-k and the texts that have it in their top-k, each pair once) in passes of `itm_rows`
rows, the image's cross-attention keys/values computed once. Target: the evaluation within 1.2x of that
sum (what it adds: similarities, top-k, the state store, packing, bookkeeping). Random weights of a
preset; images as a normalised tensor (decoding is not counted on either side). Rounds interleaved,
medians reported. Writes benchmarks/results/retrieval_eval_speed.json.

    python benchmarks/retrieval_eval_speed.py --preset mini --images 64 --captions 5 --k-test 16
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
from common import interleave, machine, median, paired_ratio, write  # noqa: E402

import blip  # noqa: E402
from blip.eval import retrieval as ev  # noqa: E402
from blip.med import KVCache  # noqa: E402
from blip.tokenizer import ENC_ID, get_tokenizer  # noqa: E402

WORDS = "a the red blue small large dog cat car house tree on under near with two three playing sitting".split()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="mini")
    ap.add_argument("--image-size", type=int, default=None, help="default: the preset's")
    ap.add_argument("--images", type=int, default=64)
    ap.add_argument("--captions", type=int, default=5, help="captions per image")
    ap.add_argument("--k-test", type=int, default=16)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--itm-rows", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--spill", action="store_true", help="states to a temporary file (max_state_bytes=0)")
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    torch.manual_seed(0)
    overrides = {"vision.image_size": args.image_size} if args.image_size else {}
    model = blip.create_model(args.preset, task="retrieval", **overrides).eval().to(args.device)
    size = model.config.vision.image_size
    pixels = torch.randn(args.images, 3, size, size)
    g = torch.Generator().manual_seed(1)
    texts = [" ".join(WORDS[j] for j in torch.randint(len(WORDS), (int(torch.randint(5, 16, (1,), generator=g)),),
                                                      generator=g)) for _ in range(args.images * args.captions)]
    options = dict(k_test=args.k_test, batch_size=args.batch_size, itm_rows=args.itm_rows,
                   max_state_bytes=0 if args.spill else 2 << 30)
    dev = model.device

    # the wanted pairs, as the evaluation finds them
    ids, mask = get_tokenizer()(texts, max_length=35)
    with torch.inference_mode():
        sims = ev.retrieval_scores(model, pixels, texts, **dict(options, k_test=0))[0]
    k_i2t, k_t2i = min(args.k_test, sims.shape[1]), min(args.k_test, sims.shape[0])
    wanted = torch.zeros_like(sims, dtype=torch.bool).scatter_(1, sims.topk(k_i2t, 1).indices, True)
    wanted |= torch.zeros_like(sims, dtype=torch.bool).scatter_(0, sims.topk(k_t2i, 0).indices, True)
    enc_ids = ids.clone()
    enc_ids[:, 0] = ENC_ID
    states_all = None

    @torch.inference_mode()
    def image_part():
        nonlocal states_all
        out = []
        for s in range(0, args.images, args.batch_size):
            states = model.visual_encoder(pixels[s:s + args.batch_size].to(dev))
            F.normalize(model.vision_proj(states[:, 0]), dim=-1)
            out.append(states.cpu())
        states_all = torch.cat(out)

    @torch.inference_mode()
    def text_part():
        for s in range(0, len(texts), 256):
            cls = model.text_encoder(ids[s:s + 256].to(dev), mask[s:s + 256].to(dev), mode="text")[:, 0]
            F.normalize(model.text_proj(cls), dim=-1)

    @torch.inference_mode()
    def itm_part():
        for i in range(args.images):
            kv = model.text_encoder.cross_kv(states_all[i:i + 1].to(dev))
            rows = wanted[i].nonzero()[:, 0]
            for s in range(0, len(rows), args.itm_rows):
                r = rows[s:s + args.itm_rows]
                t = int(mask[r].sum(1).max())
                hidden = model.text_encoder(enc_ids[r, :t].to(dev), mask[r, :t].to(dev), mode="multimodal",
                                            cache=KVCache(kv, None))
                model.itm_head(hidden[:, 0])[:, 1].cpu()

    @torch.inference_mode()
    def evaluation():
        ev.retrieval_scores(model, pixels, texts, **options)

    image_part(), text_part(), itm_part(), evaluation()  # warm-up
    t = interleave({"image_encoder": image_part, "text_encoder": text_part, "itm_passes": itm_part,
                    "evaluation": evaluation}, args.repeats)
    parts = {k: median(v) for k, v in t.items() if k != "evaluation"}
    sum_rounds = [sum(t[k][i] for k in parts) for i in range(len(t["evaluation"]))]
    total = median(t["evaluation"])
    write("retrieval_eval_speed", {
        "machine": machine(args.device), "preset": args.preset, "image_size": size, "images": args.images,
        "texts": len(texts), "k_test": args.k_test, "pairs_scored": int(wanted.sum()),
        "pairs_official": args.images * k_i2t + len(texts) * k_t2i, "batch_size": args.batch_size,
        "itm_rows": args.itm_rows, "spill": args.spill, "repeats": len(t["evaluation"]),
        "parts_s": {k: round(v, 4) for k, v in parts.items()}, "parts_sum_s": round(sum(parts.values()), 4),
        "evaluation_s": round(total, 4), "ratio": round(paired_ratio(t["evaluation"], sum_rounds), 3),
        "target": 1.2})


if __name__ == "__main__":
    main()
