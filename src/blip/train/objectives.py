"""BLIP pretraining objectives: ITC with momentum distillation, ITM with hard negatives, and LM.

Each loss is a plain function on tensors (tested on small inputs); `PretrainObjective` wires them to a
`Blip` model, its momentum towers and feature queues. An objective is any module whose
`forward(batch, info)` returns a dict with a scalar "loss" (plus parts to log): the training loop
knows nothing else, so finetuning objectives plug into the same loop.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..med import KVCache
from ..tokenizer import DEC_ID, ENC_ID, MASK_ID, PAD_ID, SEP_ID
from . import distributed as dist


@dataclass
class StepInfo:
    """Where the loop is: optimizer step `step` of `steps_per_epoch` in `epoch`."""
    epoch: int = 0
    step: int = 0
    steps_per_epoch: int = 1
    first_micro_batch: bool = True  # the first forward of an optimizer step (momentum update)


# ------------------------------------------------------------------------------ parameter sharing
def tie_text_towers(model: nn.Module, skip: str = "attention") -> list[str]:
    """Make `model.text_decoder.bert` use the text encoder's modules, except self-attention
    (`encoder.layer.i.attention`), like the official `tie_encoder_decoder_weights(.., '/attention')`.
    The LM head stays the decoder's, re-tied to the shared word embeddings. Returns the tied paths."""
    tied: list[str] = []

    def tie(src: nn.Module, dst: nn.Module, path: str) -> None:
        for name, child in src.named_children():
            if name == skip:
                continue
            if any(n.rsplit(".", 1)[-1] == skip for n, _ in child.named_modules() if n):
                tie(child, getattr(dst, name), f"{path}{name}.")
            else:
                setattr(dst, name, child)
                tied.append(path + name)

    decoder = model.text_decoder
    tie(model.text_encoder, decoder.bert, "")
    decoder.cls.predictions.decoder.weight = decoder.bert.embeddings.word_embeddings.weight
    return tied


# ------------------------------------------------------------------------------ momentum towers
class MomentumTowers(nn.Module):
    """EMA copies of the ITC towers and the two feature queues (official names: `visual_encoder_m`,
    ..., `image_queue`, `text_queue`, `queue_ptr`)."""

    NAMES = ("visual_encoder", "vision_proj", "text_encoder", "text_proj")

    def __init__(self, model: nn.Module, momentum: float = 0.995, queue_size: int = 57600, queue_init: str = "empty",
                 ids: bool = False):
        super().__init__()
        if queue_init not in ("empty", "random"):
            raise ValueError(f"queue_init must be 'empty' or 'random', not {queue_init!r}")
        self.momentum = momentum
        for name in self.NAMES:
            tower = copy.deepcopy(getattr(model, name))
            tower.requires_grad_(False)
            setattr(self, name + "_m", tower)
        for block in self.visual_encoder_m.blocks:  # the official copy has no grad checkpointing
            block.use_checkpoint = False
        dim = model.vision_proj.out_features
        # "random": the official unit vectors. "empty": zero columns, left out of the loss until written
        # (random negatives pull every feature towards the other modality's mean; from scratch that
        # collapses both towers before the queue holds real features)
        for name in ("image_queue", "text_queue"):
            queue = torch.zeros(dim, queue_size)
            self.register_buffer(name, F.normalize(queue.normal_(), dim=0) if queue_init == "random" else queue)
        if ids:  # retrieval: the image id of every queued pair (-100: none yet, never a positive), official idx_queue
            self.register_buffer("idx_queue", torch.full((1, queue_size), -100, dtype=torch.long))
        self.register_buffer("queue_ptr", torch.zeros(1, dtype=torch.long))
        self._full = False  # every column written: set on the first check that finds it so (also after a resume)

    def pairs(self, model: nn.Module) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        online, ema = [], []
        for name in self.NAMES:
            online += list(getattr(model, name).parameters())
            ema += list(getattr(self, name + "_m").parameters())
        return online, ema

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """p_m = m * p_m + (1 - m) * p for every parameter."""
        online, ema = self.pairs(model)
        torch._foreach_mul_(ema, self.momentum)
        torch._foreach_add_(ema, online, alpha=1.0 - self.momentum)

    @torch.no_grad()
    def features(self, images, ids, mask) -> tuple[torch.Tensor, torch.Tensor]:
        """L2-normalised momentum ITC features (float32)."""
        image = self.vision_proj_m(self.visual_encoder_m(images)[:, 0])
        text = self.text_proj_m(self.text_encoder_m(ids, mask, mode="text")[:, 0])
        return F.normalize(image.float(), dim=-1), F.normalize(text.float(), dim=-1)

    def _written(self) -> torch.Tensor | None:
        """Which queue columns hold features: None once all do; before that the non-zero ones (an
        "empty" queue starts as zeros)."""
        if not self._full:
            written = self.image_queue.any(0)
            if not bool(written.all()):
                return written
            self._full = True
        return None

    def queues(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The written columns of the two queues, (D, Q')."""
        written = self._written()
        if written is None:
            return self.image_queue, self.text_queue
        return self.image_queue[:, written], self.text_queue[:, written]

    def id_queue(self) -> torch.Tensor:
        """The image ids of the columns `queues()` returns, (Q',)."""
        written = self._written()
        return self.idx_queue[0] if written is None else self.idx_queue[0, written]

    @torch.no_grad()
    def enqueue(self, image_feat: torch.Tensor, text_feat: torch.Tensor, ids: torch.Tensor | None = None) -> None:
        """Write the features (and image ids) of every rank (rank order) at the pointer, then advance it.
        A queue of size 0 (in-batch negatives only) keeps nothing."""
        size = self.image_queue.shape[1]
        if size == 0:
            return
        image_feat, text_feat = dist.gather(image_feat), dist.gather(text_feat)
        n = image_feat.shape[0]
        assert size % n == 0, f"queue size {size} is not a multiple of the global batch {n}"
        ptr = int(self.queue_ptr)
        self.image_queue[:, ptr:ptr + n] = image_feat.T.to(self.image_queue.dtype)
        self.text_queue[:, ptr:ptr + n] = text_feat.T.to(self.text_queue.dtype)
        if ids is not None:
            self.idx_queue[0, ptr:ptr + n] = dist.gather(ids)
        self.queue_ptr[0] = (ptr + n) % size


# ------------------------------------------------------------------------------ losses
def ramped_alpha(alpha: float, epoch: int, step: int, steps_per_epoch: int, ramp_epochs: float = 2) -> float:
    """alpha * min(1, (epoch * steps_per_epoch + step) / (ramp_epochs * steps_per_epoch))."""
    if ramp_epochs <= 0:
        return alpha
    return alpha * min(1.0, (epoch * steps_per_epoch + step) / (ramp_epochs * steps_per_epoch))


def soft_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return -(F.log_softmax(logits, dim=1) * targets).sum(1).mean()


def itc_loss(image_feat, text_feat, image_feat_m, text_feat_m, image_queue, text_queue, temp, alpha,
             positives: torch.Tensor | None = None):
    """Contrastive loss against [momentum batch ; queue] with distilled targets
    alpha * softmax(momentum sims) + (1 - alpha) * positives, positives the one-hot diagonal
    (pretraining) or given: (B, B + Q) rows summing to one (retrieval: every pair of the same image).
    Features (B, D) normalised, queues (D, Q) (Q may be 0; without given positives the two queues may differ
    in length, e.g. extra text negatives: PretrainObjective's itc_swap_negatives). Returns (loss, sim_i2t,
    sim_t2i), sims (B, B + Q)."""
    image_all = torch.cat([image_feat_m.T, image_queue], dim=1)
    text_all = torch.cat([text_feat_m.T, text_queue], dim=1)
    with torch.no_grad():
        if positives is None:
            pos_i2t = torch.zeros(image_feat.shape[0], text_all.shape[1], device=text_all.device).fill_diagonal_(1)
            pos_t2i = torch.zeros(image_feat.shape[0], image_all.shape[1], device=image_all.device).fill_diagonal_(1)
        else:
            pos_i2t = pos_t2i = positives
        i2t_targets = alpha * (image_feat_m @ text_all / temp).softmax(1) + (1 - alpha) * pos_i2t
        t2i_targets = alpha * (text_feat_m @ image_all / temp).softmax(1) + (1 - alpha) * pos_t2i
    sim_i2t = image_feat @ text_all / temp
    sim_t2i = text_feat @ image_all / temp
    loss = (soft_cross_entropy(sim_i2t, i2t_targets) + soft_cross_entropy(sim_t2i, t2i_targets)) / 2
    return loss, sim_i2t, sim_t2i


@torch.no_grad()
def itm_negative_weights(sim: torch.Tensor, offset: int = 0, same: torch.Tensor | None = None,
                         eps: float = 1e-4) -> torch.Tensor:
    """Hard-negative sampling weights softmax(sim) + eps with the own pair (row i, column offset + i) at
    0, or (retrieval, official eps 0) every pair `same` marks (B, N; the same image). sim (B, N): this
    batch's rows against the N candidates (the batch, or all ranks' batches). A row left all zero (every
    candidate is the same image) gets uniform weights, where the official code would stop."""
    w = sim.float().softmax(dim=1) + eps
    if same is None:
        rows = torch.arange(sim.shape[0], device=sim.device)
        w[rows, rows + offset] = 0
    else:
        w.masked_fill_(same, 0)
        w[w.sum(1) == 0] = 1.0
    return w


def sample_negatives(weights: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """One column per row, drawn with probability proportional to the row's weights."""
    return torch.multinomial(weights, 1, generator=generator).squeeze(1)


def swap_states(text_encoder, ids: torch.Tensor, mask: torch.Tensor, kv, rows: torch.Tensor | None,
                every_token: bool = False) -> torch.Tensor:
    """[ENC] states (every token's with every_token) of word-swap negatives: image rows[j] with ids[j] (its
    own caption, one attribute replaced; [CLS] first), reusing those images' cross-attention keys/values
    (rows None: text j with image j, the keys/values as they are, no copy)."""
    ids = ids.clone()
    ids[:, 0] = ENC_ID
    cache = KVCache(kv if rows is None else [(k[rows], v[rows]) for k, v in kv], None)
    states = text_encoder(ids, mask, mode="multimodal", cache=cache)
    return states if every_token else states[:, 0]


def replaced_tokens(ids: torch.Tensor, mask: torch.Tensor, swap_ids: torch.Tensor,
                    swap_mask: torch.Tensor) -> torch.Tensor:
    """(N, T') bool: the tokens of each swapped caption that are not the original's, i.e. between the
    longest common prefix and the longest common suffix of the two token sequences (a swap replaces one
    word or phrase, possibly of another length)."""
    out = torch.zeros_like(swap_mask, dtype=torch.bool)
    for j in range(len(ids)):
        a, b = ids[j][mask[j].bool()].tolist(), swap_ids[j][swap_mask[j].bool()].tolist()
        p = 0
        while p < min(len(a), len(b)) and a[p] == b[p]:
            p += 1
        s = 0
        while s < min(len(a), len(b)) - p and a[-1 - s] == b[-1 - s]:
            s += 1
        out[j, p:len(b) - s] = True
    return out


def replaced_token_loss(logits: torch.Tensor, replaced: torch.Tensor) -> torch.Tensor:
    """Replaced-token detection (ELECTRA's, grounded): the ITM logits (N, 2) of a word-swapped caption's
    tokens say whether each matches the image (label 1) or was put in by the swap (replaced, label 0). The
    two kinds are averaged separately so that the one or two replaced tokens weigh as much as the rest."""
    logits = logits.float()
    loss = logits.new_zeros(())
    for rows, label in ((replaced, 0), (~replaced, 1)):
        if bool(rows.any()):
            loss = loss + 0.5 * F.cross_entropy(logits[rows], rows.new_full((int(rows.sum()),), label, dtype=torch.long))
    return loss


def itm_loss(pos_logits: torch.Tensor, neg_logits: torch.Tensor,
             neg_weight: torch.Tensor | None = None) -> torch.Tensor:
    """CE over [positives ; negatives] with labels 1 / 0; neg_weight (one per negative, positives 1) makes it
    the weighted mean."""
    logits = torch.cat([pos_logits, neg_logits]).float()
    labels = torch.cat([torch.ones(len(pos_logits)), torch.zeros(len(neg_logits))]).long().to(logits.device)
    if neg_weight is None:
        return F.cross_entropy(logits, labels)
    w = torch.cat([neg_weight.new_ones(len(pos_logits)), neg_weight]).float()
    return (F.cross_entropy(logits, labels, reduction="none") * w).sum() / w.sum()


def hard_negatives(text_encoder, image_embeds, kv, enc_ids, mask, w_t2i, w_i2t, all_rank: bool = False):
    """One negative image per text (rows of w_t2i) and one negative text per image (rows of w_i2t), drawn
    from this batch or, with all_rank, from every rank's batch (the images' states gathered with their
    gradient, the texts' ids and masks gathered: equal widths). Returns the negative texts' (ids, mask)
    and the negative images' cross-attention K/V."""
    neg_img, neg_txt = sample_negatives(w_t2i), sample_negatives(w_i2t)
    if all_rank:
        cand_ids, cand_mask = dist.gather(enc_ids), dist.gather(mask)
        neg_kv = text_encoder.cross_kv(dist.gather_with_grad(image_embeds)[neg_img])
    else:
        cand_ids, cand_mask = enc_ids, mask
        neg_kv = [(k[neg_img], v[neg_img]) for k, v in kv]
    return cand_ids[neg_txt], cand_mask[neg_txt], neg_kv


def itm_states(text_encoder, ids, mask, neg_ids, neg_mask, kv, neg_kv):
    """[ENC] states of (image b, text b), (image b, negative text b) — one pass sharing each image's
    K/V — and (negative image b, text b)."""
    bs = ids.shape[0]
    rows = torch.stack([ids, neg_ids], 1).flatten(0, 1)  # image b owns rows 2b, 2b+1
    rows_mask = torch.stack([mask, neg_mask], 1).flatten(0, 1)
    both = text_encoder(rows, rows_mask, mode="multimodal", cache=KVCache(kv, None))[:, 0].view(bs, 2, -1)
    neg_image = text_encoder(ids, mask, mode="multimodal", cache=KVCache(neg_kv, None))[:, 0]
    return both[:, 0], both[:, 1], neg_image


def shifted_targets(ids: torch.Tensor, mask: torch.Tensor, prompt_length: int = 0) -> torch.Tensor:
    """Next-token targets (B, T-1): pads and the first prompt_length tokens ignored (-100)."""
    targets = ids.masked_fill(mask == 0, -100)[:, 1:].clone()
    if prompt_length:
        targets[:, :prompt_length - 1] = -100
    return targets


class _SmoothedCrossEntropy(torch.autograd.Function):
    """Mean label-smoothed cross-entropy over (N, V) logits, in row chunks that stay in cache.

    Equal to F.cross_entropy(logits.float(), targets, label_smoothing=eps): per row
    lse - (1 - eps) * x[target] - eps * mean(x). The gradient (softmax - (1 - eps) onehot - eps / V)
    is written straight in the logits' dtype. The unfused version (cast to fp32, log_softmax, its
    backward, zero-filled buffers, cast back) moved the (N, 30524) logits through memory ~8 times and
    was ~20% of a bf16 pretraining step at the official-measured small shape."""

    @staticmethod
    def forward(ctx, logits, targets, eps: float, chunk: int):
        n = logits.shape[0]
        lse = torch.empty(n, dtype=torch.float32, device=logits.device)
        total = torch.zeros((), dtype=torch.float32, device=logits.device)
        for i in range(0, n, chunk):
            x = logits[i:i + chunk].float()
            lse[i:i + chunk] = torch.logsumexp(x, -1)
            picked = x.gather(1, targets[i:i + chunk, None])[:, 0]
            total += (lse[i:i + chunk] - (1 - eps) * picked - eps * x.mean(-1)).sum()
        ctx.save_for_backward(logits, targets, lse)
        ctx.eps, ctx.chunk = eps, chunk
        return total / n

    @staticmethod
    def backward(ctx, grad_out):
        logits, targets, lse = ctx.saved_tensors
        eps, chunk = ctx.eps, ctx.chunk
        n, v = logits.shape
        scale = grad_out.float() / n
        grad = torch.empty_like(logits)
        for i in range(0, n, chunk):
            p = (logits[i:i + chunk].float() - lse[i:i + chunk, None]).exp_().sub_(eps / v)
            p.scatter_add_(1, targets[i:i + chunk, None],
                           torch.full((p.shape[0], 1), -(1 - eps), dtype=p.dtype, device=p.device))
            grad[i:i + chunk] = p.mul_(scale)
        return grad, None, None, None


def lm_loss(logits: torch.Tensor, targets: torch.Tensor, label_smoothing: float = 0.1,
            chunk: int | None = None) -> torch.Tensor:
    """Mean label-smoothed CE over the targets that are not -100; logits (..., V), targets (...).
    chunk: rows per block (default 32 on CPU, where a block stays in cache; 4096 elsewhere)."""
    logits, targets = logits.reshape(-1, logits.shape[-1]), targets.reshape(-1)
    keep = targets != -100
    if not bool(keep.all()):
        logits, targets = logits[keep], targets[keep]
    if targets.numel() == 0:
        return logits.sum().float() * 0.0
    if chunk is None:
        chunk = 32 if logits.device.type == "cpu" else 4096
    return _SmoothedCrossEntropy.apply(logits, targets, float(label_smoothing), chunk)


def caption_words(rows: torch.Tensor, n: int, skip: int = 1) -> torch.Tensor:
    """Multi-hot (B, n) of the rows (B, T) each caption holds; -100 ignored, and the first `skip` columns
    ([CLS] or [DEC]) too. The closing [SEP] stays: a constant target, learnt as a bias."""
    rows = rows[:, skip:]
    hot = torch.zeros(rows.shape[0], n + 1, device=rows.device)
    hot.scatter_(1, rows.masked_fill(rows < 0, n), 1.0)
    return hot[:, :n]


def image_words_loss(patch_logits: torch.Tensor, words: torch.Tensor) -> torch.Tensor:
    """Which words the caption holds, read from the image alone: every patch scores every word, a word's
    score is its best patch's (multiple-instance: one patch holding the object is enough), and the loss is
    per-word binary cross-entropy summed over the vocabulary, divided by the caption's number of distinct
    words and averaged over the batch. patch_logits (B, P, V), words (B, V) multi-hot."""
    logits = patch_logits.float().amax(1)
    bce = F.binary_cross_entropy_with_logits(logits, words, reduction="none").sum(1)
    return (bce / words.sum(1).clamp(min=1)).mean()


def mask_tokens(ids: torch.Tensor, mask: torch.Tensor, probability: float = 0.15,
                generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """ALBEF's MLM corruption: each real token (not [CLS]/[ENC] first, pads or [SEP]) is picked with
    `probability`; of the picked, 80% become [MASK], 10% another token of the batch (so a trimmed
    vocabulary still holds it), 10% stay. Returns (corrupted ids, targets: the picked tokens' ids, else -100)."""
    real = (mask > 0) & (ids != SEP_ID) & (ids != PAD_ID)
    real[:, 0] = False
    u = torch.rand(ids.shape, generator=generator, device=ids.device)
    picked = real & (u < probability)
    targets = ids.masked_fill(~picked, -100)
    v = torch.rand(ids.shape, generator=generator, device=ids.device)
    out = ids.clone()
    out[picked & (v < 0.8)] = MASK_ID
    swap = picked & (v >= 0.8) & (v < 0.9)
    if bool(swap.any()):
        pool = ids[real]
        out[swap] = pool[torch.randint(len(pool), (int(swap.sum()),), generator=generator, device=ids.device)]
    return out, targets


def unimodal_features(model, images, ids, mask):
    """(ViT states, normalised ITC image features, normalised ITC text features), the temperature clamped to
    [0.001, 0.5] first, as the official pretraining and retrieval forwards begin."""
    with torch.no_grad():
        model.temp.clamp_(0.001, 0.5)
    image_embeds = model.visual_encoder(images)
    image_feat = F.normalize(model.vision_proj(image_embeds[:, 0]).float(), dim=-1)
    text_feat = F.normalize(model.text_proj(model.text_encoder(ids, mask, mode="text")[:, 0]).float(), dim=-1)
    return image_embeds, image_feat, text_feat


# ------------------------------------------------------------------------------ the objective
class PretrainObjective(nn.Module):
    """loss = ITC + ITM + LM over a batch {"image", "input_ids", "attention_mask"} ([CLS] first).

    Options beyond the paper, for short from-scratch runs (off by default): `distill=False` drops the
    momentum towers (ITC against the online in-batch features, gradients through both sides, as CLIP);
    `itc_only_steps` trains ITC alone for the first steps; before `itm_hard_from` (None: never) ITM's
    in-batch negatives are drawn uniformly rather than by similarity (not with negatives_all_rank); from
    `itm_swap_from` on, a batch carrying "neg_input_ids" (captions with one attribute word replaced, see
    `blip.train.data.WordSwap`) gives ITM one more negative per pair. `itm_pairs`: ITM on the first N pairs
    of the batch only, negatives drawn among them (ITM's text passes are most of a small model's step).
    `itc_swap_negatives` (with distill=False): those word-swapped captions are extra ITC text negatives too,
    so that ITC's image feature must tell a caption from the same caption with one attribute changed.
    `rtd`: weight of replaced-token detection on those swapped captions (`replaced_token_loss`), a label per
    token where ITM has one per pair."""

    def __init__(self, model: nn.Module, queue_size: int = 57600, momentum: float = 0.995, alpha: float = 0.4,
                 alpha_ramp_epochs: float = 2, negatives_all_rank: bool = False, label_smoothing: float = 0.1,
                 queue_init: str = "empty", itc_only_steps: int = 0, distill: bool = True,
                 loss_weights: dict | None = None, itm_hard_from: int | None = 0,
                 itm_swap_from: int = 0, itm_pairs: int | None = None, itc_swap_negatives: bool = False,
                 image_words: float = 0.0, mlm: float = 0.0, mlm_probability: float = 0.15, rtd: float = 0.0):
        super().__init__()
        self.mlm_weight, self.mlm_probability = mlm, mlm_probability
        self.rtd_weight = rtd
        if itc_swap_negatives and distill:
            raise ValueError("itc_swap_negatives adds text negatives to in-batch ITC: it needs distill=False")
        self.itc_swap_negatives = itc_swap_negatives
        self.model = model
        if itm_pairs is not None and itm_pairs < 2:
            raise ValueError(f"itm_pairs must be at least 2 (a pair and its negative), not {itm_pairs}")
        if itm_pairs is not None and negatives_all_rank:
            raise ValueError("itm_pairs draws negatives from this rank's first pairs: not with negatives_all_rank")
        self.itm_pairs = itm_pairs
        self.itm_hard_from, self.itm_swap_from = itm_hard_from, itm_swap_from
        self.weights = {"ita": 1.0, "itm": 1.0, "lm": 1.0, **(loss_weights or {})}
        if set(self.weights) != {"ita", "itm", "lm"}:
            raise ValueError(f"loss_weights takes ita, itm and lm, not {sorted(set(self.weights) - {'ita', 'itm', 'lm'})}")
        self.itc_only_steps = itc_only_steps
        if model.text_decoder.bert.embeddings is not model.text_encoder.embeddings:
            tie_text_towers(model)
        if not distill and queue_size:
            raise ValueError("distill=False keeps no momentum features: set queue_size to 0")
        self.momentum = MomentumTowers(model, momentum, queue_size, queue_init) if distill else None
        self.alpha, self.alpha_ramp_epochs = alpha, alpha_ramp_epochs
        self.negatives_all_rank = negatives_all_rank
        self.label_smoothing = label_smoothing
        self.image_words = image_words
        if image_words:  # a training-only head: not part of the saved model
            head = model.text_decoder.cls.predictions.decoder
            self.word_head = nn.Linear(model.vision_proj.in_features, head.out_features)
            nn.init.zeros_(self.word_head.weight)
            nn.init.constant_(self.word_head.bias, -math.log(head.out_features))

    def forward(self, batch: dict, info: StepInfo = StepInfo()) -> dict:
        m = self.model
        images, ids, mask = batch["image"], batch["input_ids"], batch["attention_mask"]
        alpha = ramped_alpha(self.alpha, info.epoch, info.step, info.steps_per_epoch, self.alpha_ramp_epochs)
        image_embeds, image_feat, text_feat = unimodal_features(m, images, ids, mask)
        if self.momentum is not None:
            with torch.no_grad():
                if info.first_micro_batch:
                    self.momentum.update(m)
                image_feat_m, text_feat_m = self.momentum.features(images, ids, mask)
            queues = self.momentum.queues()
        else:  # the online features stand in for the momentum ones: plain in-batch InfoNCE
            alpha, image_feat_m, text_feat_m = 0.0, image_feat, text_feat
            queues = (image_feat.new_zeros(image_feat.shape[1], 0),) * 2
        step = info.epoch * info.steps_per_epoch + info.step
        neg_feat = self.swap_text_features(batch) if self.itc_swap_negatives and step >= self.itm_swap_from else None
        if neg_feat is not None:  # image-to-text gets these columns too (ITM draws among the batch's, [:, :B])
            queues = (queues[0], torch.cat([queues[1], neg_feat.T], dim=1))
        with torch.autocast(images.device.type, enabled=False):
            loss_ita, sim_i2t, sim_t2i = itc_loss(image_feat, text_feat, image_feat_m, text_feat_m, *queues, m.temp, alpha)
        if step < self.itc_only_steps:
            # ITC alone first: from scratch, ITM's hard negatives and LM's grounding need aligned features
            # to learn from, and an ITC-only step costs a fraction of a full one
            loss_itm = loss_lm = loss_ita.new_zeros(())
        else:
            kv = m.text_encoder.cross_kv(image_embeds)  # one K/V per image for every cross-attention pass
            if self.itm_hard_from is None or step < self.itm_hard_from:  # in-batch negatives drawn uniformly
                sim_i2t, sim_t2i = torch.zeros_like(sim_i2t), torch.zeros_like(sim_t2i)
            swap = [batch.get(k) for k in ("neg_input_ids", "neg_attention_mask", "neg_valid")]
            loss_itm, loss_rtd = self.itm(image_embeds, image_feat, text_feat, ids, mask, sim_i2t, sim_t2i, kv,
                                          *(swap if step >= self.itm_swap_from else ()))
            loss_lm = self.lm(ids, mask, image_embeds, kv)
        if self.momentum is not None:
            self.momentum.enqueue(image_feat_m, text_feat_m)
        n = min(ids.shape[0], self.itm_pairs or ids.shape[0])
        swaps = int(batch["neg_valid"][:n].sum()) if "neg_valid" in batch and step >= self.itm_swap_from else 0
        p = n / (3 * n + swaps)  # ITM's positive share: a head that learnt nothing sits at H(p)
        w = self.weights
        loss = w["ita"] * loss_ita + w["itm"] * loss_itm + w["lm"] * loss_lm
        out = {}
        if self.rtd_weight and step >= self.itc_only_steps:
            loss = loss + self.rtd_weight * loss_rtd
            out["loss_rtd"] = loss_rtd.detach()
        if self.mlm_weight and step >= self.itc_only_steps:
            loss_mlm = self.mlm(ids, mask, kv)
            loss = loss + self.mlm_weight * loss_mlm
            out["loss_mlm"] = loss_mlm.detach()
        if self.image_words:
            words = caption_words(m.text_decoder.cls.target_rows(ids.masked_fill(mask == 0, -100)),
                                  self.word_head.out_features)
            loss_words = image_words_loss(self.word_head(image_embeds[:, 1:]), words)
            loss = loss + self.image_words * loss_words
            out["loss_words"] = loss_words.detach()
        return {"loss": loss, **out, "loss_ita": loss_ita.detach(), "loss_itm": loss_itm.detach(),
                "loss_lm": loss_lm.detach(), "alpha": alpha, "temp": m.temp.detach(),
                "itm_prior": -(p * math.log(p) + (1 - p) * math.log(1 - p))}

    def swap_text_features(self, batch: dict) -> torch.Tensor | None:
        """ITC text features (N, D) of the batch's valid word-swapped captions; None when it has none."""
        if "neg_valid" not in batch or not bool(batch["neg_valid"].any()):
            return None
        m, rows = self.model, batch["neg_valid"].nonzero()[:, 0]
        states = m.text_encoder(batch["neg_input_ids"][rows], batch["neg_attention_mask"][rows], mode="text")
        return F.normalize(m.text_proj(states[:, 0]).float(), dim=-1)

    def itm(self, image_embeds, image_feat, text_feat, ids, mask, sim_i2t, sim_t2i, kv,
            swap_ids=None, swap_mask=None, swap_valid=None) -> torch.Tensor:
        m, bs = self.model, ids.shape[0]
        if self.itm_pairs is not None and bs > self.itm_pairs:
            bs = self.itm_pairs
            image_embeds, image_feat, text_feat, ids, mask = (t[:bs] for t in (image_embeds, image_feat, text_feat,
                                                                               ids, mask))
            sim_i2t, sim_t2i = sim_i2t[:bs, :bs], sim_t2i[:bs, :bs]
            kv = [(k[:bs], v[:bs]) for k, v in kv]
            if swap_ids is not None:
                swap_ids, swap_mask, swap_valid = swap_ids[:bs], swap_mask[:bs], swap_valid[:bs]
        enc_ids = ids.clone()
        enc_ids[:, 0] = ENC_ID
        all_rank = self.negatives_all_rank and dist.world_size() > 1
        with torch.no_grad():
            if all_rank:
                offset = dist.rank() * bs
                w_t2i = itm_negative_weights(text_feat @ dist.gather(image_feat).T / m.temp, offset)
                w_i2t = itm_negative_weights(image_feat @ dist.gather(text_feat).T / m.temp, offset)
            else:
                w_t2i, w_i2t = itm_negative_weights(sim_t2i[:, :bs]), itm_negative_weights(sim_i2t[:, :bs])
        neg_ids, neg_mask, neg_kv = hard_negatives(m.text_encoder, image_embeds, kv, enc_ids, mask, w_t2i, w_i2t,
                                                   all_rank)
        pos, neg_text, neg_image = itm_states(m.text_encoder, enc_ids, mask, neg_ids, neg_mask, kv, neg_kv)
        negatives = [neg_text, neg_image]
        loss_rtd = pos.new_zeros(())
        if swap_ids is not None and bool(swap_valid.any()):  # (image b, its caption with one word replaced)
            rows = swap_valid.nonzero()[:, 0]
            states = swap_states(m.text_encoder, swap_ids[rows], swap_mask[rows], kv, rows, every_token=True)
            negatives.append(states[:, 0])
            if self.rtd_weight:  # every token but [ENC] and the pads
                replaced = replaced_tokens(ids[rows], mask[rows], swap_ids[rows], swap_mask[rows])
                valid = swap_mask[rows].bool().clone()
                valid[:, 0] = False
                loss_rtd = replaced_token_loss(m.itm_head(states[valid]), replaced[valid])
        logits = m.itm_head(torch.cat([pos, *negatives]))
        return itm_loss(logits[:bs], logits[bs:]), loss_rtd

    def itm_states(self, ids, mask, neg_ids, neg_mask, kv, neg_kv):
        return itm_states(self.model.text_encoder, ids, mask, neg_ids, neg_mask, kv, neg_kv)

    def mlm(self, ids, mask, kv, generator: torch.Generator | None = None) -> torch.Tensor:
        """Image-grounded masked-language modelling (ALBEF; not in BLIP): the [ENC] encoder, bidirectional,
        restores masked caption words from the rest of the caption and the image; the decoder's LM head
        (tied to the shared word embeddings) reads its states. Dense per-word grounding for the tower ITM reads."""
        corrupted, targets = mask_tokens(ids, mask, self.mlm_probability, generator)
        corrupted[:, 0] = ENC_ID
        hidden = self.model.text_encoder(corrupted, mask, mode="multimodal", cache=KVCache(kv, None))
        keep = targets != -100
        cls = self.model.text_decoder.cls
        return lm_loss(cls.rows(hidden[keep]), cls.target_rows(targets[keep]), 0.0)

    def lm(self, ids, mask, image_embeds, kv) -> torch.Tensor:
        dec = self.model.text_decoder
        dec_ids = ids.clone()
        dec_ids[:, 0] = DEC_ID
        if dec.bert.layers[0].crossattention is not self.model.text_encoder.layers[0].crossattention:
            kv = dec.bert.cross_kv(image_embeds)
        hidden = dec.bert(dec_ids, mask, mode="causal", cache=KVCache(kv, None))
        targets = shifted_targets(dec_ids, mask)
        keep = targets != -100  # the LM head only runs where there is a target
        return lm_loss(dec.cls.rows(hidden[:, :-1][keep]), dec.cls.target_rows(targets[keep]), self.label_smoothing)
