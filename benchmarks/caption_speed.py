"""Captioning speed: ours against transformers on the same random `base` weights, side by side.

384 px, 8 images, beam 3 (min 5, max 20), greedy and nucleus sampling; fp32 for both, plus our
dtype="bf16" (image encoder bf16, text fp32) and "bf16-full" against transformers fp32. Reports
images/s, the ratio, the decoding part (total minus the image encoder; every ratio is the median over
rounds of the two sides run back to back) and whether the tokens are identical (ours with
length_normalization="generated", the rule current transformers uses).
Writes benchmarks/results/caption_speed.json (caption_speed_cuda.json with --device cuda: both sides on
the GPU, the card's name recorded).

    python benchmarks/caption_speed.py [--images 8] [--repeats 3] [--short-repeats 4] [--device cpu]
                                       [--modes beam3,greedy,sample] [--no-bf16] [--budget-minutes 8]

A full run takes ~8 minutes on this 2-core VM. On a slow hour, rounds that would end past
--budget-minutes are dropped (each series keeps at least 2), to keep the run under 10 minutes; the
results list every round that ran.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import hf_base_caption, interleave, machine, median, paired_ratio, round_ratios, write  # noqa: E402

import blip  # noqa: E402
from blip.generation import GenerationConfig, generate  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3, help="rounds for beam 3 and the bf16 runs")
    ap.add_argument("--short-repeats", type=int, default=4,
                    help="rounds for the image encoder, greedy and sampling (short runs, so noisier ratios)")
    ap.add_argument("--image-size", type=int, default=384)
    ap.add_argument("--modes", default="beam3,greedy,sample")
    ap.add_argument("--no-bf16", action="store_true")
    ap.add_argument("--device", default="cpu", help="cpu or cuda (both sides run there)")
    ap.add_argument("--name", help="results file name (benchmarks/results/NAME.json; default caption_speed, "
                                   "or caption_speed_cuda on a GPU)")
    ap.add_argument("--budget-minutes", type=float, default=8.0,
                    help="after this, each remaining series runs its minimum of 2 rounds")
    args = ap.parse_args()
    started = time.perf_counter()
    deadline = started + 60 * args.budget_minutes
    dev = torch.device(args.device)
    name = args.name or ("caption_speed" if dev.type == "cpu" else f"caption_speed_{dev.type}")

    torch.manual_seed(0)
    hf, folder = hf_base_caption(args.image_size, device=dev)
    ours = blip.load(folder, device=dev)
    px = torch.randn(args.images, 3, args.image_size, args.image_size).to(dev)
    prompt = ours.prompt_ids("a picture of ", args.images)
    hf_prompt = torch.cat([prompt, torch.full((args.images, 1), 102, device=dev)], dim=1)
    modes = {"beam3": dict(num_beams=3), "greedy": dict(num_beams=1),
             "sample": dict(do_sample=True, top_p=0.9, num_beams=1)}
    result = {"machine": machine(args.device), "images": args.images, "image_size": args.image_size,
              "max_length": 20, "min_length": 5, "repeats": args.repeats,
              "short_repeats": args.short_repeats, "budget_minutes": args.budget_minutes, "targets": {}}

    def hf_caption(kw: dict):
        """transformers' end-to-end captioning for one of `modes` (sampling with repetition penalty 1.1)."""
        def run():
            torch.manual_seed(0)
            with torch.inference_mode():
                return hf.generate(pixel_values=px, input_ids=hf_prompt.clone(), max_length=20, min_length=5,
                                   repetition_penalty=1.1 if kw.get("do_sample") else 1.0, **kw)
        return run

    def hf_vit():
        with torch.inference_mode():
            return hf.vision_model(pixel_values=px).last_hidden_state

    def our_vit():
        return ours.encode_image(px)

    vit = interleave({"transformers": hf_vit, "ours": our_vit}, args.short_repeats, deadline)
    result["image_encoder_s"] = {k: median(v) for k, v in vit.items()}
    result["image_encoder_ratio"] = paired_ratio(vit["transformers"], vit["ours"])

    # bf16: image encoder bf16, text fp32; bf16-full: every weight. Their beam-3 runs join the fp32 beam-3 rounds
    # (one transformers fp32 series serves all three ratios, which keeps the whole run under 10 minutes).
    others = {} if args.no_bf16 else {dtype: blip.load(folder, device=dev, dtype=dtype)
                                      for dtype in ("bf16", "bf16-full")}
    bf16_sides = {dtype: (lambda other=other: other.generate_ids(px, prompt="a picture of ", max_length=20,
                                                                 min_length=5, num_beams=3,
                                                                 length_normalization="generated")[0])
                  for dtype, other in others.items()}  # the beam rule transformers (and our fp32 side) use
    for run in bf16_sides.values():
        run()  # warm up (packs the bf16 decoder weights)
    bf16_times = None

    for mode in filter(None, args.modes.split(",")):
        kw = modes[mode]
        sample = kw.get("do_sample", False)

        run_hf = hf_caption(kw)

        def run_ours():
            torch.manual_seed(0)
            return ours.generate_ids(px, prompt="a picture of ", max_length=20, min_length=5, sample=sample,
                                     top_p=0.9, num_beams=kw["num_beams"], length_normalization="generated")[0]

        with torch.inference_mode():
            hf_states = hf.vision_model(pixel_values=px).last_hidden_state
            our_states = ours.encode_image(px)

        def decode_hf():  # what BlipForConditionalGeneration.generate runs after the image encoder
            torch.manual_seed(0)
            with torch.inference_mode():
                return hf.text_decoder.generate(
                    input_ids=prompt.clone(), eos_token_id=102, pad_token_id=0, encoder_hidden_states=hf_states,
                    encoder_attention_mask=torch.ones(hf_states.shape[:2], dtype=torch.long, device=dev),
                    max_length=20, min_length=5, repetition_penalty=1.1 if sample else 1.0, **kw)

        def decode_ours():
            torch.manual_seed(0)
            cfg = GenerationConfig(num_beams=kw["num_beams"], max_length=20, min_length=5, do_sample=sample,
                                   top_p=0.9, repetition_penalty=1.1 if sample else 1.0,
                                   length_normalization="generated")
            absorb = ours.text_decoder.absorb_pays(cfg.num_beams, cfg.max_length - prompt.shape[1])
            with torch.inference_mode():
                return generate(ours.text_decoder.start(our_states, absorb=absorb), prompt, cfg)

        ref, mine = run_hf(), run_ours()
        width = max(ref.shape[1], mine.shape[1])
        pad = lambda t: torch.nn.functional.pad(t, (0, width - t.shape[1]))  # noqa: E731
        identical = torch.equal(pad(ref), pad(mine))
        repeats = args.repeats if kw["num_beams"] > 1 else args.short_repeats
        sides = {"transformers": run_hf, "ours": run_ours}
        if mode == "beam3":
            sides.update(bf16_sides)
        t = interleave(sides, repeats, deadline)
        if mode == "beam3" and bf16_sides:
            bf16_times = t
        hf_s, our_s = median(t["transformers"]), median(t["ours"])
        d = interleave({"transformers": decode_hf, "ours": decode_ours}, repeats, deadline)
        hf_dec, our_dec = median(d["transformers"]), median(d["ours"])
        result["targets"][mode] = {
            "transformers_images_per_s": args.images / hf_s, "ours_images_per_s": args.images / our_s,
            "end_to_end_ratio": paired_ratio(t["transformers"], t["ours"]),
            "decoding_ratio": paired_ratio(d["transformers"], d["ours"]),
            "transformers_decoding_s": hf_dec, "ours_decoding_s": our_dec,
            "tokens_identical": identical, "transformers_s": t["transformers"], "ours_s": t["ours"],
            "end_to_end_round_ratios": round_ratios(t["transformers"], t["ours"]),
            "decoding_round_ratios": round_ratios(d["transformers"], d["ours"])}
        print(f"{mode}: ours {args.images / our_s:.2f} img/s, transformers {args.images / hf_s:.2f} img/s, "
              f"ratio {result['targets'][mode]['end_to_end_ratio']:.2f}x, "
              f"decoding {result['targets'][mode]['decoding_ratio']:.2f}x, identical={identical}",
              file=sys.stderr)

    if bf16_sides:
        if bf16_times is None:  # beam 3 was not among --modes: a transformers fp32 beam-3 series of its own
            bf16_times = interleave({"transformers": hf_caption(modes["beam3"]), **bf16_sides}, args.repeats,
                                    deadline)
        emb32 = ours.embed_images(px, project=False).float()
        for dtype, other in others.items():
            cos = torch.nn.functional.cosine_similarity(emb32, other.embed_images(px, project=False).float(), dim=-1)
            result["targets"][dtype.replace("-", "_") + "_beam3"] = {
                "dtype": dtype,
                "end_to_end_ratio_vs_transformers_fp32": paired_ratio(bf16_times["transformers"], bf16_times[dtype]),
                "ours_images_per_s": args.images / median(bf16_times[dtype]),
                "round_ratios": round_ratios(bf16_times["transformers"], bf16_times[dtype]),
                "image_embedding_min_cosine_to_fp32": cos.min().item()}
            print(dtype, result["targets"][dtype.replace("-", "_") + "_beam3"], file=sys.stderr)
    result["minutes"] = (time.perf_counter() - started) / 60
    write(name, result)


if __name__ == "__main__":
    main()
