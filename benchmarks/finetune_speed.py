"""Finetuning step speed against transformers: pairs/s of one caption / VQA training step (forward, backward,
AdamW) of blip's objective and of transformers' `BlipForConditionalGeneration` / `BlipForQuestionAnswering`
(their own loss, `labels=`), the very same random weights, fp32 and bf16 autocast, interleaved repeats,
medians. The retrieval objective (ITC with the id queue + ITM) has no transformers counterpart; its pairs/s
is reported beside the caption step's.

Shapes: `small_shape` (ViT 64 px / patch 8 / 256 x 4, text 256 x 4: pretrain_speed.py's official_small,
batch 32) and `base224` (ViT-B/16 at 224 px + BERT-base, batch 8). Writes benchmarks/results/finetune_speed.json.

    python benchmarks/finetune_speed.py [--repeats 5] [--configs small_shape,base224]
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import hf_base, interleave, machine, median, write  # noqa: E402

CONFIGS = {  # name: (vision, text, batch)
    "small_shape": (dict(image_size=64, patch_size=8, hidden_size=256, intermediate_size=1024, num_hidden_layers=4,
                         num_attention_heads=4),
                    dict(hidden_size=256, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=4), 32),
    "base224": (dict(image_size=224), dict(num_attention_heads=12), 8),
}
CAPTIONS = ["a picture of a red circle on the left of a blue star", "a picture of two objects on a striped background"]
QUESTIONS = ["what color is the circle", "how many objects are there"]
ANSWERS = ["red", "two"]


def hf_model(kind: str, vision: dict, text: dict):
    model, folder = hf_base(kind, vision.get("image_size", 384), vision=vision, text=text)
    return model.train(), folder


def step_fn(loss_fn, params, bf16: bool):
    opt = torch.optim.AdamW(params, lr=1e-5, weight_decay=0.05)

    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = loss_fn()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step


def sides_for(task: str, vision: dict, text: dict, batch: int, bf16: bool) -> dict:
    import blip
    from blip.train import build_objective
    kind = {"caption": "BlipForConditionalGeneration", "vqa": "BlipForQuestionAnswering"}[task]
    hf, folder = hf_model(kind, vision, text)
    ours = blip.load(folder, task=task, device="cpu").train()
    s = vision.get("image_size", 384)
    images = torch.randn(batch, 3, s, s, generator=torch.Generator().manual_seed(1))
    reps = -(-batch // 2)
    from blip.tokenizer import get_tokenizer
    tok = get_tokenizer()
    if task == "caption":
        texts = (CAPTIONS * reps)[:batch]
        ids, mask = tok(texts, max_length=40)
        objective = build_objective("caption", ours, prompt="a picture of ")
        batch_ours = {"image": images, "text": [t[len("a picture of "):] for t in texts]}
        ours_loss = lambda: objective(batch_ours)["loss"]  # noqa: E731
        hf_loss = lambda: hf(pixel_values=images, input_ids=ids, attention_mask=mask, labels=ids).loss  # noqa: E731
    else:
        questions, answers = (QUESTIONS * reps)[:batch], (ANSWERS * reps)[:batch]
        q_ids, q_mask = tok(questions, max_length=35)
        a_ids, a_mask = tok(answers, max_length=10)
        objective = build_objective("vqa", ours)
        batch_ours = {"image": images, "question": questions, "answer": answers,
                      "weight": torch.ones(batch), "n": torch.ones(batch, dtype=torch.long)}
        ours_loss = lambda: objective(batch_ours)["loss"]  # noqa: E731
        hf_loss = lambda: hf(input_ids=q_ids, attention_mask=q_mask, pixel_values=images, labels=a_ids).loss  # noqa: E731
    return {"blip": step_fn(ours_loss, [p for p in objective.parameters() if p.requires_grad], bf16),
            "transformers": step_fn(hf_loss, [p for p in hf.parameters() if p.requires_grad], bf16)}


def retrieval_side(vision: dict, text: dict, batch: int, bf16: bool):
    import blip
    from blip.train import build_objective
    _, folder = hf_model("BlipForImageTextRetrieval", vision, text)
    model = blip.load(folder, task="retrieval", device="cpu").train()
    s = vision.get("image_size", 384)
    objective = build_objective("retrieval", model, queue_size=batch * 8)
    data = {"image": torch.randn(batch, 3, s, s), "text": (CAPTIONS * batch)[:batch],
            "image_id": torch.arange(batch)}
    return step_fn(lambda: objective(data)["loss"], [p for p in objective.parameters() if p.requires_grad], bf16)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--configs", default=",".join(CONFIGS))
    args = ap.parse_args()
    torch.manual_seed(0)
    result = {"machine": machine(), "repeats": args.repeats, "configs": {}}
    for name in args.configs.split(","):
        vision, text, batch = CONFIGS[name]
        row = {"batch": batch}
        for precision in ("fp32", "bf16"):
            bf16 = precision == "bf16"
            for task in ("caption", "vqa"):
                sides = sides_for(task, vision, text, batch, bf16)
                for fn in sides.values():  # warm up (first-call allocations, oneDNN kernels)
                    fn()
                t0 = time.perf_counter()
                times = interleave(sides, args.repeats)
                cell = {side: {"pairs_per_s": batch / median(ts), "step_s": sorted(ts)} for side, ts in times.items()}
                cell["ratio_vs_transformers"] = cell["blip"]["pairs_per_s"] / cell["transformers"]["pairs_per_s"]
                cell["seconds"] = round(time.perf_counter() - t0, 1)
                row[f"{task}_{precision}"] = cell
                print(name, task, precision, f"ratio {cell['ratio_vs_transformers']:.2f}", file=sys.stderr)
                del sides
            step = retrieval_side(vision, text, batch, bf16)
            step()
            ts = interleave({"blip": step}, args.repeats)["blip"]
            row[f"retrieval_{precision}"] = {"blip": {"pairs_per_s": batch / median(ts), "step_s": sorted(ts)}}
        result["configs"][name] = row
    write("finetune_speed", result)


if __name__ == "__main__":
    main()
