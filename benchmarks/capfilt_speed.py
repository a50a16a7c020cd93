"""CapFilt speed: `blip capfilt` (blip.capfilt.bootstrap) against what a user does today with transformers,
on the same random `base` weights, side by side.

transformers side, per batch of images: BlipImageProcessor, BlipForConditionalGeneration.generate
(do_sample, top_p 0.9, repetition penalty 1.1, max 20 / min 5, prompt "a picture of "), then for each
text (the web one and the synthetic one) BlipForImageTextRetrieval twice: use_itm_head=True (softmax ->
P(match)) and False (cosine). Ours: bootstrap() end to end (decoding, captioning, filtering, writing
bootstrapped.json, shards, audit.parquet) into a fresh folder each round; models loaded once on both
sides. Both sides read the same JPEG files (the synthetic corpus). Reports images/s, the ratio
(median over rounds of the two sides run back to back) and, as a check that the weights are the same,
the largest ITC difference on the web texts (transformers' ITM puts [CLS] first, ours [ENC], so ITM is
not compared). Writes benchmarks/results/capfilt_speed[_bf16][_cuda].json.

    python benchmarks/capfilt_speed.py [--images 8] [--batch-size 8] [--image-size 384] [--repeats 3]
                                       [--dtype fp32|bf16|bf16-full] [--device cpu|cuda]

--dtype bf16: ours with dtype="bf16" (image encoders bf16, text fp32), transformers in torch.bfloat16;
--dtype bf16-full: both sides with every weight in bf16.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import (hf_base, hf_base_caption, interleave, machine, median, paired_ratio, round_ratios,  # noqa: E402
                    scratch_dir, write)

import blip  # noqa: E402
from blip.capfilt import bootstrap  # noqa: E402
from blip.checkpoint import save_blip  # noqa: E402
from blip.data.synth import generate_corpus  # noqa: E402
from blip.tokenizer import pre_caption, vocab_path  # noqa: E402


def hf_base_retrieval(image_size: int, seed: int = 1):
    """transformers' BlipForImageTextRetrieval, `base` shapes, random weights, saved where our loader reads it."""
    return hf_base("BlipForImageTextRetrieval", image_size, seed)


def _bert_tokenizer():
    """transformers' BERT tokenizer over the bert-base-uncased vocabulary we ship (BlipProcessor's, offline).
    transformers 5 takes the file as `vocab=` (its `vocab_file=` builds an empty vocabulary), 4.x as `vocab_file=`."""
    from transformers import BertTokenizerFast
    for kw in ("vocab", "vocab_file"):
        try:
            tok = BertTokenizerFast(**{kw: vocab_path()})
        except TypeError:
            continue
        if tok("a dog")["input_ids"] == [101, 1037, 3899, 102]:
            return tok
    raise RuntimeError("could not build transformers' BERT tokenizer from the shipped vocabulary")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=8)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--image-size", type=int, default=384)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--dtype", choices=["fp32", "bf16", "bf16-full"], default="fp32")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--name", help="results file name (default capfilt_speed[_bf16][_cuda])")
    args = ap.parse_args()
    started = time.perf_counter()
    dev = torch.device(args.device)
    name = args.name or "capfilt_speed" + ("" if args.dtype == "fp32" else "_" + args.dtype.replace("-", "_")) + (
        f"_{dev.type}" if dev.type != "cpu" else "")
    hf_dtype = torch.float32 if args.dtype == "fp32" else torch.bfloat16

    from transformers import BlipImageProcessor
    hf_cap, cap_folder = hf_base_caption(args.image_size, device=dev)
    hf_ret, ret_folder = hf_base_retrieval(args.image_size)
    hf_cap, hf_ret = hf_cap.to(dev, hf_dtype), hf_ret.to(dev, hf_dtype)
    ours_dir = scratch_dir()  # both checkpoints converted into our format (same weights)
    save_blip(blip.load(cap_folder, device="cpu"), ours_dir / "cap")
    save_blip(blip.load(ret_folder, device="cpu"), ours_dir / "ret")
    cap = blip.load(ours_dir / "cap", device=dev, dtype=args.dtype)
    ret = blip.load(ours_dir / "ret", device=dev, dtype=args.dtype)

    corpus = scratch_dir()
    generate_corpus(corpus, n_train=args.images, n_clean=1, n_test=1, image_size=256, shard_size=args.images)
    items = json.loads((corpus / "pretrain.json").read_text())
    for it in items:
        it["image"] = str(corpus / it["image"])

    processor = BlipImageProcessor(size={"height": args.image_size, "width": args.image_size})
    tokenizer = _bert_tokenizer()
    prompt = cap.prompt_ids("a picture of ", 1).cpu()
    hf_prompt = torch.cat([prompt, torch.tensor([[102]])], dim=1)  # what BlipProcessor gives generate

    def transformers_side() -> list[dict]:
        from PIL import Image
        rows = []
        with torch.inference_mode():
            for start in range(0, len(items), args.batch_size):
                batch = items[start:start + args.batch_size]
                images = [Image.open(it["image"]).convert("RGB") for it in batch]
                px = processor(images=images, return_tensors="pt")["pixel_values"].to(dev, hf_dtype)
                torch.manual_seed(start)
                ids = hf_cap.generate(pixel_values=px, input_ids=hf_prompt.expand(len(batch), -1).to(dev).clone(),
                                      do_sample=True, top_p=0.9, max_length=20, min_length=5, repetition_penalty=1.1)
                synthetic = [t.removeprefix("a picture of ").strip()
                             for t in tokenizer.batch_decode(ids, skip_special_tokens=True)]
                for i, (it, syn) in enumerate(zip(batch, synthetic)):
                    for source, text in (("web", pre_caption(it["caption"])), ("synthetic", syn)):  # official cleaning
                        enc = tokenizer(text, return_tensors="pt", truncation=True, max_length=35).to(dev)
                        itm = hf_ret(pixel_values=px[i:i + 1], **enc, use_itm_head=True).itm_score
                        itc = hf_ret(pixel_values=px[i:i + 1], **enc, use_itm_head=False).itm_score
                        rows.append({"source": source, "itm": float(itm.float().softmax(-1)[0, 1]),
                                     "itc": float(itc.float()[0, 0])})
        return rows

    runs = []  # a fresh output folder each round

    def ours_side() -> dict:
        runs.append(scratch_dir() / "run")
        return bootstrap(cap, ret, items, runs[-1], batch_size=args.batch_size, device=args.device,
                         dtype=args.dtype)

    hf_rows, summary = transformers_side(), ours_side()  # warm-up (and transformers' scores for the ITC check)
    t = interleave({"transformers": transformers_side, "ours": ours_side}, args.repeats)
    hf_s, our_s = median(t["transformers"]), median(t["ours"])
    result = {"machine": machine(args.device), "dtype": args.dtype, "images": args.images,
              "batch_size": args.batch_size, "image_size": args.image_size, "repeats": args.repeats,
              "texts_per_image": 2, "transformers_images_per_s": args.images / hf_s,
              "ours_images_per_s": args.images / our_s,
              "ratio": paired_ratio(t["transformers"], t["ours"]),
              "round_ratios": round_ratios(t["transformers"], t["ours"]),
              "transformers_s": t["transformers"], "ours_s": t["ours"],
              "ours_bootstrapped_pairs": summary["bootstrapped_pairs"],
              "minutes": (time.perf_counter() - started) / 60}
    result["web_itc_max_abs_diff"] = _itc_check(hf_rows, runs[0])
    write(name, result)


def _itc_check(hf_rows, out: Path) -> float:
    """Largest |ITC(ours) - ITC(transformers)| over the web texts: the same weights give the same cosine."""
    import pyarrow.parquet as pq
    ours = pq.read_table(out / "audit.parquet").to_pydict()
    mine = [c for c, s in zip(ours["itc"], ours["source"]) if s == "web"]
    theirs = [r["itc"] for r in hf_rows if r["source"] == "web"]
    return max(abs(a - b) for a, b in zip(mine, theirs))


if __name__ == "__main__":
    main()
