"""Image-text retrieval finetuning: ITC with image-id positives and ITM with same-image-masked hard
negatives, as the official `BLIP_Retrieval.forward` (models/blip_retrieval.py, train_retrieval.py).

Starting from a checkpoint that holds momentum encoders and queues (an official pretrained `.pth`), the
momentum towers and the two feature queues start from those, as the official `load_checkpoint` loads
every tensor whose name and shape match (`adapt_state_dict` keeps them for the objective); otherwise
the towers are copies of the model and the queue starts per `queue_init`.

Differences from pretraining's objective (train/objectives.py), all official:
- every pair of the batch and of the queue that shows the same image is a positive of the ITC targets
  (rows normalised), so the momentum queue also keeps each column's image id (-100: none);
- alpha ramps over the first epoch only (alpha_ramp_epochs=1);
- ITM negatives are drawn from the softmax of the *online* in-batch similarities with every
  same-image pair at 0 and no +1e-4;
- there is no decoder and no LM loss.
The batch is {"image", "text": [str], "image_id"}: the objective tokenises (max_length 35).

Two options beyond the official code, off by default, for a filter on a corpus where the most similar
caption is often true of the image too (the embedded synthetic one; pretraining has the same options):
`itm_hard_from` (None: never mine) draws ITM's negatives uniformly among the other images' pairs before
that step, and a batch carrying "neg_text" (captions with one attribute replaced, `itm_swap_words`)
gives ITM one more negative per pair from `itm_swap_from` on; `rtd` weighs replaced-token detection on those
swapped captions, as in pretraining (objectives.replaced_token_loss). `negative_pool` (a caption list of
other images, e.g. the web pairs the filter will score) gives every image one more ITM negative drawn from it:
the clean pairs never show texts like numbered alt-text, which pretraining on the web pairs learnt as keys.
`itm_swap_weight` weighs the word-swap negatives in ITM's mean and `negative_pool_draws` sets the pool texts
per image (docs/capfilt.md has what each did to the filter).
"""
from __future__ import annotations

import hashlib
import json
import os

import torch
import torch.nn.functional as F
from torch import nn

from ...tokenizer import ENC_ID, get_tokenizer, pre_caption
from .. import distributed as dist
from ..objectives import (MomentumTowers, StepInfo, hard_negatives, itc_loss, itm_loss, itm_negative_weights,
                          itm_states, ramped_alpha, replaced_token_loss, replaced_tokens, swap_states,
                          unimodal_features)

MODEL_TASK = "retrieval"
__all__ = ["MODEL_TASK", "Collate", "Objective", "adapt_state_dict", "collate", "train_dataset"]
_STASH = "_retrieval_training_init"


def adapt_state_dict(sd: dict, model: nn.Module) -> dict:
    """Keep the init checkpoint's momentum encoders and queues for the Objective built next (the model
    itself has no place for them); the state dict is loaded unchanged."""
    towers = tuple(f"{name}_m." for name in MomentumTowers.NAMES)
    kept = {k: v for k, v in sd.items() if k.startswith(towers) or k in ("image_queue", "text_queue")}
    if kept:
        model.__dict__[_STASH] = kept
    return sd


@torch.no_grad()
def load_momentum(momentum: MomentumTowers, sd: dict) -> list[str]:
    """The tensors of `sd` (official names: visual_encoder_m.*, ..., image_queue, text_queue) whose name
    and shape match, the momentum ViT's pos_embed interpolated to its image size; the queue pointer and
    the id queue stay at their start (official: ptr_queue 0, idx_queue -100). Returns what was loaded."""
    from ...vit import interpolate_pos_embed
    own = momentum.state_dict()
    loaded = []
    for key, value in sd.items():
        if key == "visual_encoder_m.pos_embed" and key in own and value.shape != own[key].shape:
            value = interpolate_pos_embed(value.float(), own[key].shape[1] - 1)
        if key in own and key not in ("queue_ptr", "idx_queue") and value.shape == own[key].shape:
            own[key].copy_(value.to(own[key].dtype))
            loaded.append(key)
    if any(k in loaded for k in ("image_queue", "text_queue")):
        momentum._full = False  # rescan which columns hold features
    return loaded


class Objective(nn.Module):
    """loss = ITC + ITM over a batch {"image": (B,3,H,W), "text": [str], "image_id": (B,) long}.

    batch_size (per rank; filled from the training config) lets the queue size be checked against the
    global batch when the objective is built, not at the first step."""

    def __init__(self, model: nn.Module, queue_size: int = 57600, momentum: float = 0.995, alpha: float = 0.4,
                 alpha_ramp_epochs: float = 1.0, negatives_all_rank: bool = False, queue_init: str = "empty",
                 max_length: int = 35, text_padding: str = "longest", batch_size: int | None = None,
                 itm_hard_from: int | None = 0, itm_swap_from: int = 0, rtd: float = 0.0,
                 itm_swap_weight: float = 1.0, negative_pool=None, negative_pool_draws: int = 1,
                 max_words: int = 30):
        super().__init__()
        if not all(hasattr(model, p) for p in ("text_encoder", "vision_proj", "itm_head")):
            raise ValueError("retrieval finetuning needs a model with a text encoder, projections and the ITM head "
                             "(task 'retrieval')")
        if queue_size and batch_size and queue_size % (batch_size * dist.world_size()):
            raise ValueError(f"queue_size {queue_size} must be a multiple of the global batch "
                             f"{batch_size * dist.world_size()} (batch_size {batch_size} x {dist.world_size()} "
                             f"processes), as the official queue asserts")
        self.model = model
        self.momentum = MomentumTowers(model, momentum, queue_size, queue_init, ids=True)
        init = model.__dict__.pop(_STASH, None)
        self.init_loaded = load_momentum(self.momentum, init) if init else []
        if self.init_loaded and dist.is_main():
            print(f"blip: momentum init: loaded {len(self.init_loaded)} momentum/queue tensors from the checkpoint",
                  flush=True)
        self.alpha, self.alpha_ramp_epochs = alpha, alpha_ramp_epochs
        self.negatives_all_rank = negatives_all_rank
        self.itm_hard_from, self.itm_swap_from, self.rtd = itm_hard_from, itm_swap_from, rtd
        self.itm_swap_weight = itm_swap_weight
        self.pool = load_negative_pool(negative_pool, max_words) if negative_pool is not None else None
        self.pool_draws = negative_pool_draws
        # gathered token ids need one width on every rank
        self.max_length, self.padding = max_length, "max_length" if negatives_all_rank else text_padding

    def forward(self, batch: dict, info: StepInfo = StepInfo()) -> dict:
        m = self.model
        images, idx = batch["image"], batch["image_id"].view(-1).to(batch["image"].device)
        ids, mask = get_tokenizer()(batch["text"], max_length=self.max_length, padding=self.padding)
        ids, mask = ids.to(images.device), mask.to(images.device)
        alpha = ramped_alpha(self.alpha, info.epoch, info.step, info.steps_per_epoch, self.alpha_ramp_epochs)
        image_embeds, image_feat, text_feat = unimodal_features(m, images, ids, mask)

        # ITC: positives are all pairs of the same image, in the batch and in the queue
        with torch.no_grad():
            if info.first_micro_batch:
                self.momentum.update(m)
            image_feat_m, text_feat_m = self.momentum.features(images, ids, mask)
            idx_all = torch.cat([idx, self.momentum.id_queue()])
            positives = (idx[:, None] == idx_all[None]).float()
            positives /= positives.sum(1, keepdim=True)
        with torch.autocast(images.device.type, enabled=False):
            loss_ita, _, _ = itc_loss(image_feat, text_feat, image_feat_m, text_feat_m, *self.momentum.queues(),
                                      m.temp, alpha, positives)
        self.momentum.enqueue(image_feat_m, text_feat_m, idx)

        # ITM: one hard negative text per image and image per text, never of the same image
        step = info.epoch * info.steps_per_epoch + info.step
        mine = self.itm_hard_from is not None and step >= self.itm_hard_from  # else drawn uniformly
        bs = ids.shape[0]
        enc_ids = ids.clone()
        enc_ids[:, 0] = ENC_ID
        all_rank = self.negatives_all_rank and dist.world_size() > 1
        with torch.no_grad():
            if all_rank:
                same = idx[:, None] == dist.gather(idx)[None]
                image_cand, text_cand = dist.gather(image_feat), dist.gather(text_feat)
            else:
                same = idx[:, None] == idx[None]
                image_cand, text_cand = image_feat, text_feat
            sim_t2i, sim_i2t = text_feat @ image_cand.T / m.temp, image_feat @ text_cand.T / m.temp
            if not mine:
                sim_t2i, sim_i2t = torch.zeros_like(sim_t2i), torch.zeros_like(sim_i2t)
            w_t2i = itm_negative_weights(sim_t2i, same=same, eps=0.0)
            w_i2t = itm_negative_weights(sim_i2t, same=same, eps=0.0)
        kv = m.text_encoder.cross_kv(image_embeds)  # one K/V per image for the positive and negative-text rows
        neg_ids, neg_mask, neg_kv = hard_negatives(m.text_encoder, image_embeds, kv, enc_ids, mask, w_t2i, w_i2t,
                                                   all_rank)
        pos, neg_text, neg_image = itm_states(m.text_encoder, enc_ids, mask, neg_ids, neg_mask, kv, neg_kv)
        negatives = [neg_text, neg_image]
        if self.pool:  # (image i, a text of another image drawn from the pool), pool_draws times
            pick = torch.randint(len(self.pool), (bs * self.pool_draws,)).tolist()
            p_ids, p_mask = get_tokenizer()([self.pool[j] for j in pick], max_length=self.max_length,
                                            padding=self.padding)
            rows_p = None if self.pool_draws == 1 else torch.arange(bs, device=images.device).repeat(self.pool_draws)
            negatives.append(swap_states(m.text_encoder, p_ids.to(images.device), p_mask.to(images.device), kv,
                                         rows_p))
        swaps = batch.get("neg_text") if step >= self.itm_swap_from else None
        rows = [i for i, t in enumerate(swaps or []) if t is not None]
        out = {}
        if rows:  # (image i, its caption with one attribute replaced)
            s_ids, s_mask = get_tokenizer()([swaps[i] for i in rows], max_length=self.max_length, padding=self.padding)
            s_ids, s_mask = s_ids.to(images.device), s_mask.to(images.device)
            index = torch.tensor(rows, device=images.device)
            states = swap_states(m.text_encoder, s_ids, s_mask, kv, index, every_token=bool(self.rtd))
            negatives.append(states[:, 0] if self.rtd else states)
            if self.rtd:  # every token but [ENC] and the pads: put in by the swap or not
                valid = s_mask.bool().clone()
                valid[:, 0] = False
                replaced = replaced_tokens(ids[index], mask[index], s_ids, s_mask)
                out["loss_rtd"] = replaced_token_loss(m.itm_head(states[valid]), replaced[valid])
        logits = m.itm_head(torch.cat([pos, *negatives]))
        weight = None
        if rows and self.itm_swap_weight != 1.0:  # the swap negatives are the last len(rows)
            weight = logits.new_ones(len(logits) - bs)
            weight[-len(rows):] = self.itm_swap_weight
        loss_itm = itm_loss(logits[:bs], logits[bs:], weight)
        loss = loss_ita + loss_itm + (self.rtd * out["loss_rtd"] if "loss_rtd" in out else 0.0)
        return {"loss": loss, "loss_ita": loss_ita.detach(), "loss_itm": loss_itm.detach(),
                **{k: v.detach() for k, v in out.items()}, "alpha": alpha, "temp": m.temp.detach()}


def load_negative_pool(source, max_words: int = 30) -> list[str]:
    """The texts of `negative_pool`: a JSON caption list ([{"caption": str or [str]}], e.g. the web pairs a
    filter will score) or a list of strings, cleaned as training captions are; empty texts dropped."""
    if isinstance(source, (str, os.PathLike)):
        from ...data.annotation import read_json_list
        source = read_json_list(source, "negative_pool", "captions")
    texts = []
    for item in source if isinstance(source, list) else [None]:
        cap = item.get("caption") if isinstance(item, dict) else item
        for c in cap if isinstance(cap, list) else [cap]:
            if not isinstance(c, str):
                raise ValueError("negative_pool must be a caption list [{\"caption\": ...}] or a list of strings")
            texts.append(pre_caption(c, max_words))
    texts = [t for t in texts if t]
    if not texts:
        raise ValueError("negative_pool holds no text")
    return texts


# ------------------------------------------------------------------------------ data
def stable_id(value) -> int:
    """A non-negative 63-bit id from an image id or shard key (streams cannot number ids contiguously);
    a collision (~1e-9 for a full COCO-sized queue) would only add one false positive."""
    return int.from_bytes(hashlib.blake2b(str(value).encode(), digest_size=8).digest(), "little") >> 1


def _shards_with_ids():
    from ...data import ShardDataset

    class RetrievalShards(ShardDataset):
        """ShardDataset items plus "image_id": the sample json's image_id, else its key."""

        def __iter__(self):
            for item in super().__iter__():
                item["image_id"] = stable_id(item["meta"].get("image_id", item["key"]))
                yield item
    return RetrievalShards


def _check_files(cfg) -> None:
    for f in cfg.train_files:
        if not os.path.isfile(f):
            raise FileNotFoundError(f"train file not found: {f}")


def _unreadable(files) -> str:
    """The first of `files` that does not parse as JSON (JsonCaptionDataset's error does not say which)."""
    for f in files:
        try:
            with open(f, encoding="utf-8") as fh:
                json.load(fh)
        except ValueError:
            return str(f)
    return str(files)


def _check_annotations(ds) -> None:
    """One clear error for a file that is not a caption list (a VQA or test file) or names missing images."""
    for path, cap in zip(ds.paths, ds.captions):
        if not (isinstance(cap, str) or (isinstance(cap, list) and cap and all(isinstance(c, str) for c in cap))):
            raise ValueError(f"train_files: the entry of image {path} has no \"caption\" text; retrieval trains on "
                             f"[{{\"image\", \"caption\", \"image_id\"}}] lists such as coco_karpathy_train.json "
                             f"(a VQA file has questions instead)")
    unique = list(dict.fromkeys(ds.paths))
    missing = [p for p in unique if not os.path.isfile(p)]
    if missing:
        raise FileNotFoundError(f"{len(missing)} of {len(unique)} training images do not exist, e.g. {missing[0]} "
                                f"(relative paths resolve against image_root, else the JSON file's folder)")


def train_dataset(cfg, image_size: int, rank: int = 0, world: int = 1):
    """coco_karpathy_train / flickr30k_train lists `[{"image", "caption", "image_id"}]` or plain
    `[{"image", "caption"}]` (image_id then per image path), or webdataset shards; items carry a
    contiguous int "image_id" (shards: a hash of the json's image_id or the key)."""
    from ...data import JsonCaptionDataset
    from ...transform import TrainTransform
    transform = TrainTransform(image_size, min_scale=cfg.min_scale, randaugment=cfg.randaugment, hflip=cfg.hflip)
    if cfg.shards:
        return _shards_with_ids()(cfg.shards, transform=transform, max_words=cfg.max_words,
                                  shuffle_buffer=cfg.shuffle_buffer, seed=cfg.seed, rank=rank, world_size=world)
    if not cfg.train_files:
        raise ValueError("retrieval finetuning needs train_files (e.g. coco_karpathy_train.json) or shards")
    _check_files(cfg)
    try:
        ds = JsonCaptionDataset(cfg.train_files, image_root=cfg.image_root, transform=transform,
                                max_words=cfg.max_words, seed=cfg.seed)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{_unreadable(cfg.train_files)} is not a JSON file ({e})") from None
    _check_annotations(ds)
    return ds


class Collate:
    """Images stacked, texts kept as strings (the objective tokenises), image ids as a LongTensor."""

    def __call__(self, items: list) -> dict:
        items = [it for it in items if it is not None]
        batch = {"image": torch.stack([it["image"] for it in items]), "text": [it["text"] for it in items],
                 "image_id": torch.tensor([int(it["image_id"]) for it in items], dtype=torch.long),
                 "index": torch.tensor([int(it.get("index", -1)) for it in items], dtype=torch.long)}
        if any("neg_text" in it for it in items):  # WordSwap negatives (None: the caption has none)
            batch["neg_text"] = [it.get("neg_text") for it in items]
        return batch


def collate(cfg):
    return Collate()
