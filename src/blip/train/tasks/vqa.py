"""VQA finetuning (official `BLIP_VQA.forward(train=True)`, `data/vqa_dataset.py`, `configs/vqa.yaml`).

The question encoder reads [ENC] + question over the image; the answer decoder, from [DEC],
cross-attends the question states (repeated once per candidate answer of the question). The loss
is sum(answer weight x per-answer summed LM loss) / questions. Answer weights: for VQA, an
answer's share of the annotators; Visual Genome answers weigh 0.2.

Training files are official-format JSON lists: vqa_train.json / vqa_val.json entries
{"question_id", "image", "question", "answer": [annotator answers], "dataset": "vqa"} and vg_qa.json
entries {"image", "question", "answer": str (or a list), "dataset": "vg"}. Image paths are relative to
cfg.image_root: one folder, or {"vqa": folder, "vg": folder} (the official vqa_root / vg_root), else
to each file's folder.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset

from ...data.annotation import read_json_list
from ...tokenizer import DEC_ID, ENC_ID, get_tokenizer, pre_question
from ...transform import ImageError, TrainTransform

MODEL_TASK = "vqa"
VG_WEIGHT = 0.2  # the official weight of a Visual Genome answer
__all__ = ["MODEL_TASK", "Objective", "VqaDataset", "answer_weights", "collate", "train_dataset"]


class Objective(nn.Module):
    """batch {"image": (B,3,H,W), "question": [B str], "answer": [sum n str], "weight": (sum n,),
    "n": (B,) answers per question} -> {"loss", "loss_vqa"}."""

    def __init__(self, model, label_smoothing: float = 0.1, question_length: int = 35):
        super().__init__()
        self.model, self.label_smoothing, self.question_length = model, label_smoothing, question_length

    def forward(self, batch: dict, info=None) -> dict:
        m, tok = self.model, get_tokenizer()
        images = batch["image"]
        device = images.device
        image_states = m.visual_encoder(images)
        q_ids, q_mask = tok(batch["question"], max_length=self.question_length, first_token=ENC_ID)
        q_ids, q_mask = q_ids.to(device), q_mask.to(device)
        question_states = m.text_encoder(q_ids, q_mask, image_states, mode="multimodal")
        a_ids, a_mask = tok(batch["answer"], first_token=DEC_ID)
        n = torch.as_tensor(batch["n"], dtype=torch.long, device=device)
        if int(n.sum()) != a_ids.shape[0]:
            raise ValueError(f"the batch has {a_ids.shape[0]} answers but n sums to {int(n.sum())}")
        nll = m.text_decoder.lm_loss(a_ids.to(device), a_mask.to(device), question_states.repeat_interleave(n, 0),
                                     q_mask.repeat_interleave(n, 0), label_smoothing=self.label_smoothing,
                                     reduction="none")
        loss = (torch.as_tensor(batch["weight"], device=device).to(nll.dtype) * nll).sum() / images.shape[0]
        return {"loss": loss, "loss_vqa": loss.detach()}


def answer_weights(entry: dict, vg_weight: float = VG_WEIGHT) -> tuple[list[str], list[float]]:
    """(unique answers, weights) of one entry: VQA, each answer's count / annotators (first-seen
    order); VG, each answer vg_weight."""
    answers = entry["answer"]
    answers = [answers] if isinstance(answers, str) else list(answers)
    if entry.get("dataset", "vqa") == "vg":
        unique = list(dict.fromkeys(answers))
        return unique, [vg_weight] * len(unique)
    weights: dict[str, float] = {}
    for a in answers:
        weights[a] = weights.get(a, 0.0) + 1.0 / len(answers)
    return list(weights), list(weights.values())


def _read(path: str) -> list:
    return read_json_list(path, "VQA training", "VQA entries")


class VqaDataset(Dataset):
    """Items {"image": (3,H,W), "question": pre_question(q), "answers": [str], "weights": [float]};
    None for an image that does not decode (skipped by the loop). Every entry is checked when the
    dataset is built: a wrong format or a missing image fails then, in one line naming the file."""

    def __init__(self, files, image_root=None, transform=None, image_size: int = 480, seed: int = 0,
                 vg_weight: float = VG_WEIGHT):
        from ...eval.vqa import resolve_root
        files = [files] if isinstance(files, (str, os.PathLike)) else list(files)
        if not files:
            raise ValueError("VQA training needs train_files (vqa_train.json, vqa_val.json, vg_qa.json)")
        self.items = []
        for f in files:
            first = len(self.items)
            for k, e in enumerate(_read(f)):
                ok = isinstance(e, dict) and isinstance(e.get("image"), str) and isinstance(e.get("question"), str)
                answer = e.get("answer") if isinstance(e, dict) else None
                ok = ok and (isinstance(answer, str) or (isinstance(answer, list) and answer
                                                         and all(isinstance(a, str) for a in answer)))
                if not ok:
                    keys = sorted(e) if isinstance(e, dict) else type(e).__name__
                    raise ValueError(f"{f}: entry {k} is not a VQA training entry (needs \"image\", \"question\" "
                                     f"and \"answer\"; got {keys})")
                dataset = e.get("dataset", "vqa")
                if dataset not in ("vqa", "vg"):
                    raise ValueError(f"{f}: entry {k}: \"dataset\" must be \"vqa\" or \"vg\", not {dataset!r}")
                root = resolve_root(image_root, Path(f), dataset)
                path = e["image"] if os.path.isabs(e["image"]) else str(root / e["image"])
                answers, weights = answer_weights(e, vg_weight)
                self.items.append((path, pre_question(e["question"]), answers, weights))
            paths = dict.fromkeys(it[0] for it in self.items[first:])
            missing = next((p for p in paths if not os.path.isfile(p)), None)
            if missing:
                raise OSError(f"{f}: image not found: {missing} (set image_root)")
        self.transform = transform if transform is not None else TrainTransform(image_size)
        self.seed, self.epoch, self.skipped_images = seed, 0, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict | None:
        path, question, answers, weights = self.items[i]
        try:
            image = self.transform(path, generator=np.random.default_rng([self.seed, self.epoch, i]))
        except ImageError:
            self.skipped_images += 1
            return None
        return {"image": image, "question": question, "answers": answers, "weights": weights}


def train_dataset(cfg, image_size: int, rank: int = 0, world: int = 1):
    if cfg.val_file:  # fail now, not after the first epoch
        from ...eval.vqa import load_questions
        if any(e["answers"] is None for e in load_questions(cfg.val_file, cfg.image_root)):
            raise ValueError(f"val_file {cfg.val_file} has questions without \"answer\": VQA accuracy needs them")
    if cfg.answer_list or cfg.eval_options.get("answers"):
        from ...eval.vqa import load_answer_list
        load_answer_list(cfg.eval_options.get("answers", cfg.answer_list))
    transform = TrainTransform(image_size, min_scale=cfg.min_scale, randaugment=cfg.randaugment, hflip=cfg.hflip)
    return VqaDataset(cfg.train_files, image_root=cfg.image_root, transform=transform, seed=cfg.seed)


def collate(cfg=None):
    return collate_items


def collate_items(items: list) -> dict:
    """Items -> the batch Objective takes: answers flattened, n answers per question."""
    items = [it for it in items if it is not None]
    return {"image": torch.stack([it["image"] for it in items]),
            "question": [it["question"] for it in items],
            "answer": [a for it in items for a in it["answers"]],
            "weight": torch.tensor([w for it in items for w in it["weights"]], dtype=torch.float32),
            "n": torch.tensor([len(it["answers"]) for it in items], dtype=torch.long)}
