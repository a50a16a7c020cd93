"""NLVR2 finetuning (official `train_nlvr.py`, `data/nlvr_dataset.py`): cross-entropy of the two-image
model's True/False logits.

Items are {"image": (2, 3, H, W), "text", "label", "index"}. The augmentation is the official one: each
image through the train transform, then with probability 1/2 the two images change places, and when the
sentence has the word "left" or "right" those words change places too, so the label still holds.
"""
from __future__ import annotations

import random

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from ...eval.nlvr import load_annotation
from ...nlvr import MAX_WORDS, BlipNLVR, twin_state_dict
from ...tokenizer import pre_caption
from ...transform import TrainTransform

MODEL_TASK = "nlvr"
__all__ = ["MODEL_TASK", "NLVRDataset", "Objective", "adapt_state_dict", "build_model", "collate",
           "swap_pair", "train_dataset"]


def build_model(config) -> BlipNLVR:
    return BlipNLVR(config)


def adapt_state_dict(sd: dict, model) -> dict:
    """A one-image checkpoint's cross-attention copied into both branches (official `load_checkpoint`)."""
    return twin_state_dict(sd)


class Objective(nn.Module):
    def __init__(self, model: BlipNLVR):
        super().__init__()
        self.model = model

    def forward(self, batch: dict, info=None) -> dict:
        ids, mask = self.model.tokenize(batch["text"])
        logits = self.model(batch["image"], ids, mask)
        loss = F.cross_entropy(logits.float(), batch["label"])
        acc = (logits.argmax(-1) == batch["label"]).float().mean()
        return {"loss": loss, "loss_nlvr": loss.detach(), "acc": acc}


def swap_pair(images: tuple, sentence: str, coin: float) -> tuple[tuple, str]:
    """The official order augmentation for a coin in [0, 1): below 1/2 the pair is kept; otherwise the
    images change places and so do the words "left" and "right" (whole words of the cleaned sentence)."""
    if coin < 0.5:
        return images, sentence
    flip = {"left": "right", "right": "left"}
    return (images[1], images[0]), " ".join(flip.get(w, w) for w in sentence.split(" "))


class NLVRDataset(Dataset):
    """Training examples of NLVR2 annotation files. The randomness of item i (crops, augmentation, the
    swap) comes from the `random` module, which `SeededItems` seeds per (seed, epoch, i)."""

    def __init__(self, files, image_root=None, transform=None, image_size: int = 384):
        files = [files] if isinstance(files, str) else list(files)
        if not files:
            raise ValueError("no training data: set train_files to NLVR2 annotation files (nlvr_train.json)")
        self.examples = [e for f in files for e in load_annotation(f, image_root)]
        self.transform = transform or TrainTransform(image_size, min_scale=0.5)

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int) -> dict:
        e = self.examples[i]
        rng = np.random.default_rng(random.getrandbits(64))
        pair = tuple(self.transform(p, generator=rng) for p in e.images)
        pair, sentence = swap_pair(pair, pre_caption(e.sentence, MAX_WORDS), float(rng.random()))
        return {"image": torch.stack(pair), "text": sentence, "label": int(e.label), "index": i}


def train_dataset(cfg, image_size: int, rank: int = 0, world: int = 1) -> NLVRDataset:
    transform = TrainTransform(image_size, min_scale=cfg.min_scale, randaugment=cfg.randaugment, hflip=cfg.hflip)
    return NLVRDataset(cfg.train_files, cfg.image_root, transform)


def collate(cfg):
    return stack_items


def stack_items(items: list) -> dict:
    """Image pairs stacked (B, 2, 3, H, W), sentences kept as strings (the objective tokenises)."""
    items = [it for it in items if it is not None]
    return {"image": torch.stack([it["image"] for it in items]), "text": [it["text"] for it in items],
            "label": torch.tensor([it["label"] for it in items], dtype=torch.long),
            "index": torch.tensor([it["index"] for it in items])}
