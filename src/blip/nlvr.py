"""NLVR2: is a sentence true of a pair of images? (official `models/blip_nlvr.py`, `models/nlvr_encoder.py`)

Both images go through the ViT as one batch (first images, then second images), and the text encoder
reads the sentence ([ENC] first) with two cross-attentions per layer, one per image
(`blip.med.TwinAttention`): the first half of the layers average the two branches, the second half
concatenate them into `merge_layer`. `cls_head` on the [ENC] state gives (False, True) logits.

The official split is hard-coded at layer 6 of BERT-base's 12; for other depths the merging layers are
the second half (`merge_from(depth) = depth // 2`), which is 6 for 12.
"""
from __future__ import annotations

import torch
from torch import nn

from .config import BlipConfig
from .med import TextTransformer, init_bert_weights
from .model import ImageTextModule
from .tokenizer import ENC_ID, as_texts, get_tokenizer, pre_caption
from .vit import VisionTransformer

MAX_WORDS = 40  # the official nlvr_dataset cleans sentences with pre_caption(sentence, 40)


def merge_from(depth: int) -> int:
    """The first text layer that merges the two image branches (official: 6 of 12)."""
    return depth // 2


class BlipNLVR(ImageTextModule):
    def __init__(self, config: BlipConfig):
        super().__init__()
        if config.task != "nlvr":
            raise ValueError(f"BlipNLVR needs a config with task 'nlvr', got {config.task!r}")
        self.config = config
        width = config.text.width
        self.visual_encoder = VisionTransformer(config.vision)
        self.text_encoder = TextTransformer(config.text, cross_width=config.cross_width,
                                            twin_merge_from=merge_from(config.text.depth))
        init_bert_weights(self.text_encoder)  # merge_layer too: it belongs to the official BertModel
        # PyTorch's default Linear init, as the official head (built outside BertModel's init_weights)
        self.cls_head = nn.Sequential(nn.Linear(width, width), nn.ReLU(), nn.Linear(width, 2))
        self.tokenizer = get_tokenizer()

    def tokenize(self, texts) -> tuple[torch.Tensor, torch.Tensor]:
        """Cleaned sentences, [ENC] first, padded to the longest (the official tokenisation)."""
        texts = [pre_caption(t, MAX_WORDS) for t in as_texts(texts)]
        ids, mask = self.tokenizer(texts, max_length=self.config.text.max_positions, first_token=ENC_ID)
        return ids.to(self.device), mask.to(self.device)

    def forward(self, images: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """(B, 2) logits (False, True) for image pairs (B, 2, 3, H, W) and tokenised sentences (B, T)."""
        if images.ndim != 5 or images.shape[1] != 2:
            raise ValueError(f"expected image pairs of shape (B, 2, 3, H, W), got {tuple(images.shape)}")
        b = images.shape[0]
        states = self.visual_encoder(images.transpose(0, 1).flatten(0, 1)).to(self.text_dtype)
        hidden = self.text_encoder(input_ids, attention_mask, tuple(states.split(b)), mode="multimodal")
        return self.cls_head(hidden[:, 0])

    @torch.inference_mode()
    def logits(self, images0, images1, texts) -> torch.Tensor:
        """(B, 2) float logits for B (first image, second image, sentence) triples; images as paths / PIL
        images / bytes, or normalised (B, 3, H, W) tensors."""
        texts = as_texts(texts)
        pair = torch.stack([self.pixels(images0), self.pixels(images1)], 1)
        if pair.shape[0] != len(texts):
            raise ValueError(f"got {pair.shape[0]} image pairs and {len(texts)} sentences: give one sentence per pair")
        return self(pair, *self.tokenize(texts)).float()

    def predict(self, images0, images1, texts, batch_size: int = 16) -> list[bool]:
        """Whether each sentence is true of its image pair."""
        texts = as_texts(texts)
        images0, images1 = _listed(images0), _listed(images1)
        if not len(images0) == len(images1) == len(texts):
            raise ValueError(f"got {len(images0)} first images, {len(images1)} second images and {len(texts)} "
                             "sentences: give one of each per example")
        out = []
        for i in range(0, len(texts), batch_size):
            s = slice(i, i + batch_size)
            out += self.logits(images0[s], images1[s], texts[s]).argmax(-1).bool().tolist()
        return out


def twin_state_dict(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A one-image checkpoint (pretrained, retrieval, feature, ...) in BlipNLVR's layout, as the official
    `blip_nlvr.load_checkpoint` makes it: each text-encoder layer's `crossattention.self.*` copied to
    `self0`/`self1` and `crossattention.output.dense.*` to `dense0`/`dense1` (the shared LayerNorm keeps its
    name). `merge_layer` and `cls_head` are not in it: they start from their initialisation. A state dict
    that already has both branches is returned as it is."""
    if any(".crossattention.self0." in k for k in sd):
        return sd
    out = {}
    for key, value in sd.items():
        for one, pair in ((".crossattention.self.", (".crossattention.self0.", ".crossattention.self1.")),
                          (".crossattention.output.dense.", (".crossattention.output.dense0.",
                                                             ".crossattention.output.dense1."))):
            if key.startswith("text_encoder.") and one in key:
                # two tensors, not one twice: a model loaded by assignment would otherwise tie the branches
                out[key.replace(one, pair[0])], out[key.replace(one, pair[1])] = value, value.clone()
                break
        else:
            out[key] = value
    return out


def _listed(images):
    if isinstance(images, torch.Tensor):
        return images if images.ndim == 4 else images.unsqueeze(0)
    return list(images) if isinstance(images, (list, tuple)) else [images]
