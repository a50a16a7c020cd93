"""Captioning finetuning: the image-grounded decoder's LM loss on prompt + caption (official
`BLIP_Decoder.forward`, `train_caption.py`).

Text = prompt + caption ("a picture of " + the cleaned caption), tokenised with [DEC] first, cut at 40
tokens and padded to the longest; the targets ignore pads and the prompt's tokens
(prompt_length = len(tokens of the prompt) - 1 = 4: "[DEC] a picture of"), so only the caption
and its [SEP] are learnt; label-smoothed (0.1) cross-entropy averaged over the target tokens.
The dataset gives the cleaned caption without the prompt: the objective adds it, so the same
objective serves any data, and `prompt` is the one place to change it (the model's config.prompt
follows, so the trained model generates with the prompt it learnt).
"""
from __future__ import annotations

import torch
from torch import nn

from ...tokenizer import DEC_ID
from ..objectives import StepInfo, lm_loss, shifted_targets

MODEL_TASK = "caption"
CHECK_IMAGES = 16  # images per training file checked when the dataset is built
__all__ = ["MODEL_TASK", "Objective", "check_caption_file", "collate", "train_dataset"]


class Objective(nn.Module):
    """loss = LM loss of the decoder on prompt + caption, over {"image" (B,3,H,W), "text": [caption]}."""

    def __init__(self, model: nn.Module, prompt: str = "a picture of ", label_smoothing: float = 0.1,
                 max_length: int = 40):
        super().__init__()
        if not hasattr(model, "text_decoder") or model.config.task == "vqa":
            raise ValueError(f"captioning trains a model with an image-grounded decoder, not a "
                             f"'{model.config.task}' model")
        self.model = model
        self.prompt, self.label_smoothing, self.max_length = prompt, label_smoothing, max_length
        self.prompt_length = len(model.tokenizer.encode(prompt)) - 1  # [CLS] prompt, without its [SEP]
        model.config.prompt = prompt  # exported with the model: generation uses the prompt it was trained on

    def forward(self, batch: dict, info: StepInfo | None = None) -> dict:
        m, images = self.model, batch["image"]
        texts = [self.prompt + t for t in batch["text"]]
        ids, mask = m.tokenizer(texts, max_length=self.max_length, first_token=DEC_ID)
        ids, mask = ids.to(images.device), mask.to(images.device)
        image_embeds = m.visual_encoder(images)
        dec = m.text_decoder
        hidden = dec.bert(ids, mask, image_embeds, mode="causal")
        targets = shifted_targets(ids, mask, self.prompt_length)
        keep = targets != -100  # the LM head only runs where there is a target
        loss = lm_loss(dec.cls.rows(hidden[:, :-1][keep]), dec.cls.target_rows(targets[keep]), self.label_smoothing)
        return {"loss": loss, "loss_lm": loss.detach()}


# ------------------------------------------------------------------------------ data
def check_caption_file(path, image_root=None) -> None:
    """A captioning train file is checked now rather than item by item later: a JSON list of
    {"image", "caption": str or [str]} (karpathy train: one entry per caption, with "image_id") whose
    first CHECK_IMAGES images exist. Images missing further on are skipped and counted while training,
    like unreadable ones."""
    from ...eval.caption import check_images_exist, load_caption_annotation
    check_images_exist(path, load_caption_annotation(path, image_root)[:CHECK_IMAGES], image_root)


def train_dataset(cfg, image_size: int, rank: int = 0, world: int = 1):
    """cfg.train_files (checked by check_caption_file) or cfg.shards; the official finetuning
    transform (RandomResizedCrop from cfg.min_scale, 0.5 in the official configs, flip, RandAugment)."""
    from ...data import JsonCaptionDataset, ShardDataset
    from ...transform import TrainTransform
    from ...eval.caption import checked_annotation
    for f in (cfg.val_file, cfg.test_file):  # a bad one fails now, not after the first epoch
        if f:
            checked_annotation(f, cfg.image_root, cfg.eval_options.get("gt"))
    transform = TrainTransform(image_size, min_scale=cfg.min_scale, randaugment=cfg.randaugment, hflip=cfg.hflip)
    if cfg.shards:
        return ShardDataset(cfg.shards, transform=transform, max_words=cfg.max_words,
                            shuffle_buffer=cfg.shuffle_buffer, seed=cfg.seed, rank=rank, world_size=world)
    if not cfg.train_files:
        raise ValueError("no training data: set train_files (karpathy train format) or shards")
    for f in cfg.train_files:
        check_caption_file(f, cfg.image_root)
    return JsonCaptionDataset(cfg.train_files, image_root=cfg.image_root, transform=transform,
                              max_words=cfg.max_words, seed=cfg.seed)


def collate(cfg):
    return _collate


def _collate(items: list) -> dict:
    items = [it for it in items if it is not None]
    return {"image": torch.stack([it["image"] for it in items]), "text": [it["text"] for it in items],
            "image_id": torch.tensor([int(it.get("image_id", -1)) for it in items], dtype=torch.long)}
