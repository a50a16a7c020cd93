"""Pretraining: ITC + ITM + LM on image-text pairs (the objective lives in train/objectives.py)."""
from __future__ import annotations

from ..data import Collate, build_dataset
from ..objectives import PretrainObjective as Objective

MODEL_TASK = "pretrain"
__all__ = ["MODEL_TASK", "Objective", "collate", "train_dataset"]


def train_dataset(cfg, image_size: int, rank: int = 0, world: int = 1):
    return build_dataset(cfg, image_size, rank, world)


def collate(cfg):
    return Collate(cfg.max_length, cfg.text_padding)
