"""MED: the one BERT-style text transformer behind every BLIP text role.

`mode="text"`       unimodal encoder ([CLS] first; bidirectional, no cross-attention) for ITC;
`mode="multimodal"` image-grounded encoder ([ENC] first; cross-attention after self-attention);
`mode="causal"`     image-grounded decoder ([DEC] first; causal self-attention), with a KV cache.

NLVR2's encoder (`twin_merge_from`) gives every layer two cross-attentions, one per image of a pair
(`TwinAttention`); `encoder_states` is then a pair of (B, S, W) tensors.

Parameter names follow the official checkpoints (`encoder.layer.{i}.attention.self.query`, ...), so
official state dicts load without renaming. Cross-attention keys/values are computed once per image
(or question) and shared by all rows that belong to it: rows are grouped contiguously, and a group's
queries are stacked along the query axis instead of copying the image states per row.
"""
from __future__ import annotations

import threading
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from . import packed
from .attention import attention, dropout
from .config import TextConfig


def _heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    b, n, d = x.shape
    return x.view(b, n, heads, d // heads).transpose(1, 2)


def _merge(x: torch.Tensor) -> torch.Tensor:
    b, h, n, d = x.shape
    return x.transpose(1, 2).reshape(b, n, h * d)


def grouped_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
                      dropout_p: float) -> torch.Tensor:
    """Attention of R query rows over G key/value groups, R = G * K, rows of a group contiguous."""
    r, h, t, d = q.shape
    g = k.shape[0]
    if r == g:
        return attention(q, k, v, mask, dropout_p)
    per = r // g
    q = q.view(g, per, h, t, d).transpose(1, 2).reshape(g, h, per * t, d)
    out = attention(q, k, v, mask, dropout_p)
    return out.view(g, h, per, t, d).transpose(1, 2).reshape(r, h, t, d)


_probe = threading.local()  # the cross-attention module being recorded in this thread, if any


@contextmanager
def record_cross_attention(module: "AttentionProjections"):
    """While active, this thread's forwards through the cross-attention `module` take an explicit
    softmax path and append its probabilities (R, heads, T, S; fp32, requiring grad) to the yielded
    list, for Grad-CAM (`blip.grounding`). Every other module and thread keeps the fused kernel."""
    prev = getattr(_probe, "target", None), getattr(_probe, "probs", None)
    _probe.target, _probe.probs = module, []
    try:
        yield _probe.probs
    finally:
        _probe.target, _probe.probs = prev


def _probed_attention(q, k, v, mask, dropout_p: float) -> torch.Tensor:
    """`grouped_attention` with the probabilities materialised and recorded (see record_cross_attention)."""
    per = q.shape[0] // k.shape[0]
    if per > 1:
        k, v = k.repeat_interleave(per, 0), v.repeat_interleave(per, 0)
        mask = None if mask is None else mask.repeat_interleave(per, 0)
    scores = (q * q.shape[-1] ** -0.5) @ k.transpose(-1, -2)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    probs = scores.softmax(-1, dtype=torch.float32)
    if not probs.requires_grad and torch.is_grad_enabled():
        probs.requires_grad_()  # frozen weights: the probabilities become the leaf to differentiate
    _probe.probs.append(probs)
    if dropout_p > 0:
        probs = dropout(probs, dropout_p)
    return probs.to(v.dtype) @ v


@dataclass
class RawStates:
    """Unprojected cross-attention inputs (G, S, W) for `AttentionProjections.absorbed`. One copy serves
    both matmuls (the scores read it transposed): a step streams it from memory twice a layer, and a
    contiguous transposed copy, though faster to multiply when cache-hot, made greedy decoding of 8
    `base` images 1.13x slower (beam 3 1.10x, sampling 1.06x; same-process A/B, same tokens)."""
    x: torch.Tensor

    @classmethod
    def of(cls, states: torch.Tensor) -> "RawStates":
        return cls(states)

    def select(self, groups: torch.Tensor) -> "RawStates":
        return RawStates(self.x[groups])


class AttentionProjections(nn.Module):
    """Q from the text; K/V from the text (self) or from the image/question states (cross)."""

    def __init__(self, width: int, heads: int, kv_width: int, dropout: float):
        super().__init__()
        self.heads = heads
        self.dropout = dropout
        self.query = packed.Linear(width, width)
        self.key = packed.Linear(kv_width, width)
        self.value = packed.Linear(kv_width, width)

    def kv(self, states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return _heads(self.key(states), self.heads), _heads(self.value(states), self.heads)

    def qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Self-attention Q, K, V, split into heads; one fused matmul while decoding packs weights."""
        layers = (self.query, self.key, self.value)
        out = packed.fused(x, layers)
        if out is None:
            return _heads(self.query(x), self.heads), *self.kv(x)
        return tuple(_heads(t, self.heads) for t in out.split([m.out_features for m in layers], -1))

    def absorbed(self, x: torch.Tensor, states: RawStates, mask: torch.Tensor | None) -> torch.Tensor:
        """Cross-attention straight over the unprojected states (G, S, kv_width), for R = G * K query rows
        of width `width`: scores = (q W_k) X^T, since the key bias adds one constant to all of a query's
        scores, which softmax ignores; output = (p X) W_v^T + b_v, since p sums to one. For few-row decoding
        (greedy, sampling) this replaces projecting every layer's K/V once (~130 GFLOP for 8 `base` images
        at 384 px) and then reading them every step, with reading X (14 MB for those 8 images) twice a layer."""
        r, t, _ = x.shape
        g, s, kv = states.x.shape
        h = self.heads
        d = self.query.out_features // h
        q = self.query(x).view(r * t, h, d).transpose(0, 1) * d ** -0.5  # (h, r*t, d)
        qk = torch.bmm(q, self.key.weight.view(h, d, kv))  # (h, r*t, kv)
        qk = qk.view(h, g, r // g * t, kv).transpose(0, 1).reshape(g, -1, kv)  # (g, h*per*t, kv)
        scores = torch.bmm(qk, states.x.transpose(1, 2))
        if mask is not None:
            scores = scores.masked_fill(~mask.view(g, 1, s), float("-inf"))
        # Logit gaps over ~87 give probabilities below the smallest normal float: they add nothing to the
        # output (bit for bit), but denormal operands made this bmm 14x slower (11 vs 0.8 ms for 8 `base`
        # images, 13% denormal). Flushing them costs 10 us.
        probs = F.threshold(scores.softmax(-1), torch.finfo(scores.dtype).tiny, 0.0)
        ctx = torch.bmm(probs, states.x)  # (g, h*per*t, kv)
        ctx = ctx.view(g, h, -1, kv).transpose(0, 1).reshape(h, r * t, kv)
        out = torch.baddbmm(self.value.bias.view(h, 1, d), ctx, self.value.weight.view(h, d, kv).transpose(1, 2))
        return out.transpose(0, 1).reshape(r, t, h * d)


class Dropout(nn.Dropout):
    """nn.Dropout with `blip.attention.dropout`'s cheaper CPU mask (bernoulli_ was 18% of a small bf16
    pretraining step on CPU)."""

    def forward(self, x):
        return dropout(x, self.p) if self.training and self.p > 0 else x


class AttentionOutput(nn.Module):
    def __init__(self, cfg: TextConfig, in_width: int | None = None):
        super().__init__()
        self.dense = packed.Linear(in_width or cfg.width, cfg.width)
        self.LayerNorm = nn.LayerNorm(cfg.width, eps=cfg.layer_norm_eps)
        self.dropout = Dropout(cfg.dropout)

    def forward(self, x, residual):
        return self.LayerNorm(self.dropout(self.dense(x)) + residual)


class Attention(nn.Module):
    def __init__(self, cfg: TextConfig, kv_width: int):
        super().__init__()
        self.self = AttentionProjections(cfg.width, cfg.heads, kv_width, cfg.attention_dropout)
        self.output = AttentionOutput(cfg)

    def kv(self, states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.self.kv(states)


class TwinAttentionOutput(nn.Module):
    """NLVR2's cross-attention output (official `nlvr_encoder.BertSelfOutput(twin=True)`): one dense per
    image branch, then their mean, or from `merge` on a Linear over their concatenation; one residual
    LayerNorm shared by both branches."""

    def __init__(self, cfg: TextConfig, merge: bool):
        super().__init__()
        self.dense0 = packed.Linear(cfg.width, cfg.width)
        self.dense1 = packed.Linear(cfg.width, cfg.width)
        self.LayerNorm = nn.LayerNorm(cfg.width, eps=cfg.layer_norm_eps)
        self.dropout = Dropout(cfg.dropout)
        if merge:
            self.merge_layer = packed.Linear(2 * cfg.width, cfg.width)

    def forward(self, a0, a1, residual):
        h0, h1 = self.dense0(a0), self.dense1(a1)
        h = self.merge_layer(torch.cat([h0, h1], -1)) if hasattr(self, "merge_layer") else (h0 + h1) / 2
        return self.LayerNorm(self.dropout(h) + residual)


class TwinAttention(nn.Module):
    """Two cross-attentions from the same text queries, `self0` over the first image and `self1` over
    the second, combined by `TwinAttentionOutput` (official names, so `model_base_nlvr.pth` loads)."""

    def __init__(self, cfg: TextConfig, kv_width: int, merge: bool):
        super().__init__()
        self.self0 = AttentionProjections(cfg.width, cfg.heads, kv_width, cfg.attention_dropout)
        self.self1 = AttentionProjections(cfg.width, cfg.heads, kv_width, cfg.attention_dropout)
        self.output = TwinAttentionOutput(cfg, merge)

    def kv(self, states: tuple[torch.Tensor, torch.Tensor]) -> tuple:
        return self.self0.kv(states[0]), self.self1.kv(states[1])

    def forward(self, x, kv: tuple, masks: tuple, training: bool) -> torch.Tensor:
        out = []
        for proj, (k, v), mask in zip((self.self0, self.self1), kv, masks):
            q = _heads(proj.query(x), proj.heads)
            out.append(_merge(grouped_attention(q, k, v, mask, proj.dropout if training else 0.0)))
        return self.output(*out, x)


class Intermediate(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.dense = packed.Linear(cfg.width, cfg.ffn)
        if cfg.activation != "gelu":
            raise ValueError(f"unsupported activation {cfg.activation!r}")

    def forward(self, x):
        return F.gelu(self.dense(x))


class Layer(nn.Module):
    """self-attention -> cross-attention (multimodal/causal only) -> FFN, post-LN residuals."""

    def __init__(self, cfg: TextConfig, cross_width: int | None, twin_merge: bool | None = None):
        super().__init__()
        self.attention = Attention(cfg, cfg.width)
        if cross_width:
            self.crossattention = (Attention(cfg, cross_width) if twin_merge is None
                                   else TwinAttention(cfg, cross_width, twin_merge))
        self.intermediate = Intermediate(cfg)
        self.output = AttentionOutput(cfg, cfg.ffn)

    def forward(self, x, self_mask, cross_kv, cross_mask, cache: "KVCache | None", index: int, causal: bool):
        proj = self.attention.self
        drop = proj.dropout if self.training else 0.0
        q, k, v = proj.qkv(x)
        if cache is not None:
            k, v = cache.append(index, k, v)
        if causal and self_mask is None and q.shape[2] == k.shape[2]:
            a = attention(q, k, v, dropout_p=drop, causal=True)
        else:
            a = attention(q, k, v, self_mask, drop)
        x = self.attention.output(_merge(a), x)
        if cross_kv is not None and isinstance(self.crossattention, TwinAttention):
            x = self.crossattention(x, cross_kv, cross_mask, self.training)
        elif cross_kv is not None:
            cproj = self.crossattention.self
            if isinstance(cross_kv, RawStates):
                a = cproj.absorbed(x, cross_kv, cross_mask)
            else:
                q = _heads(cproj.query(x), cproj.heads)
                run = _probed_attention if getattr(_probe, "target", None) is cproj else grouped_attention
                a = _merge(run(q, cross_kv[0], cross_kv[1], cross_mask, cproj.dropout if self.training else 0.0))
            x = self.crossattention.output(a, x)
        return self.output(self.intermediate(x), x)


class _Embedding(nn.Embedding):
    """nn.Embedding without its random init on the meta device, where `blip.load` builds the model:
    `normal_` on a meta tensor imports torch._dynamo, 1.2-1.8 s of a cold `blip caption` here."""

    def reset_parameters(self):
        if not self.weight.is_meta:
            super().reset_parameters()


def _id_rows(cfg: TextConfig) -> torch.Tensor | None:
    """Token id -> row of a trimmed vocabulary (None when it is not trimmed). On the CPU even while the
    model is built on the meta device: a non-persistent buffer is never loaded from a checkpoint."""
    if cfg.vocab_ids is None:
        return None
    from .tokenizer import UNK_ID
    ids = torch.tensor(cfg.vocab_ids, dtype=torch.long, device="cpu")
    rows = torch.full((cfg.vocab_size,), cfg.vocab_ids.index(UNK_ID), dtype=torch.long, device="cpu")
    rows[ids] = torch.arange(len(ids), device="cpu")
    return rows


class Embeddings(nn.Module):
    """Word + absolute position embeddings (no token types), LayerNorm, dropout."""

    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.word_embeddings = _Embedding(cfg.rows, cfg.width, padding_idx=0)
        self.position_embeddings = _Embedding(cfg.max_positions, cfg.width)
        self.LayerNorm = nn.LayerNorm(cfg.width, eps=cfg.layer_norm_eps)
        self.dropout = Dropout(cfg.dropout)
        # a trimmed vocabulary: token id -> embedding row; ids it lacks read as [UNK]
        self.register_buffer("id_rows", _id_rows(cfg), persistent=False)

    def forward(self, input_ids, offset: int = 0):
        t = input_ids.shape[1]
        if offset + t > self.position_embeddings.num_embeddings:
            raise ValueError(f"text of {offset + t} tokens exceeds the {self.position_embeddings.num_embeddings} positions")
        if self.id_rows is not None:
            input_ids = self.id_rows[input_ids]
        pos = torch.arange(offset, offset + t, device=input_ids.device)
        x = self.word_embeddings(input_ids) + self.position_embeddings(pos)
        return self.dropout(self.LayerNorm(x))


class _Stack(nn.Module):
    def __init__(self, cfg: TextConfig, cross_width: int | None, twin_merge_from: int | None = None):
        super().__init__()
        twin = [None if twin_merge_from is None else i >= twin_merge_from for i in range(cfg.depth)]
        self.layer = nn.ModuleList(Layer(cfg, cross_width, twin[i]) for i in range(cfg.depth))


@dataclass
class KVCache:
    """Self-attention keys/values in pre-allocated buffers (R, heads, capacity, head_dim) per layer,
    grown by doubling, plus the cross-attention inputs shared by each group of rows: per-layer (K, V)
    pairs, or the raw states for `AttentionProjections.absorbed`."""
    cross_kv: list | RawStates
    cross_mask: torch.Tensor | None
    buffers: list = field(default_factory=list)
    length: int = 0

    def append(self, index: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write the new keys/values after the cached ones; return views of everything so far."""
        end = self.length + k.shape[2]
        if index == len(self.buffers):
            shape = (k.shape[0], k.shape[1], max(32, 2 * end), k.shape[3])
            self.buffers.append((k.new_empty(shape), v.new_empty(shape)))
        kb, vb = self.buffers[index]
        if end > kb.shape[2]:
            grown = (kb.shape[0], kb.shape[1], 2 * end, kb.shape[3])
            kb, vb = _copy_into(kb.new_empty(grown), kb, self.length), _copy_into(vb.new_empty(grown), vb, self.length)
            self.buffers[index] = (kb, vb)
        kb[:, :, self.length:end] = k
        vb[:, :, self.length:end] = v
        return kb[:, :, :end], vb[:, :, :end]

    def select(self, rows: torch.Tensor) -> None:
        """Keep/duplicate/reorder rows (beam search): one gather per buffer."""
        self.buffers = [(k.index_select(0, rows), v.index_select(0, rows)) for k, v in self.buffers]


def _copy_into(dst: torch.Tensor, src: torch.Tensor, n: int) -> torch.Tensor:
    dst[:, :, :n] = src[:, :, :n]
    return dst


def key_padding_mask(mask: torch.Tensor | None, dtype=torch.bool) -> torch.Tensor | None:
    """(B, S) 1/0 -> (B, 1, 1, S) boolean 'may attend', or None when nothing is masked."""
    if mask is None or bool(mask.all()):
        return None
    return mask[:, None, None, :].bool()


class TextTransformer(nn.Module):
    def __init__(self, cfg: TextConfig, cross_width: int | None, twin_merge_from: int | None = None):
        """twin_merge_from: NLVR2's two-image encoder, whose layers from this index on merge the two
        cross-attention branches through a Linear (earlier ones average them); None: one image."""
        super().__init__()
        self.cfg = cfg
        self.twin = twin_merge_from is not None
        self.embeddings = Embeddings(cfg)
        self.encoder = _Stack(cfg, cross_width, twin_merge_from)

    @property
    def layers(self):
        return self.encoder.layer

    def cross_kv(self, states: torch.Tensor) -> list:
        return [layer.crossattention.kv(states) for layer in self.layers]

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                encoder_states: torch.Tensor | None = None, encoder_mask: torch.Tensor | None = None,
                mode: str = "multimodal", cache: KVCache | None = None) -> torch.Tensor:
        """Hidden states (R, T, width). encoder_states (G, S, cross_width) with R a multiple of G:
        rows [i*R/G, (i+1)*R/G) attend to group i. The two-image encoder takes a pair of (R, S, W)
        states (and masks)."""
        if mode not in ("text", "multimodal", "causal"):
            raise ValueError(f"unknown mode {mode!r}")
        causal = mode == "causal"
        offset = cache.length if cache is not None else 0
        x = self.embeddings(input_ids, offset)
        t = input_ids.shape[1]
        self_mask = key_padding_mask(attention_mask)
        if causal and (self_mask is not None or (offset and t > 1)):
            total = offset + t
            allowed = torch.ones(t, total, dtype=torch.bool, device=x.device).tril(offset)
            self_mask = allowed[None, None] if self_mask is None else (self_mask & allowed[None, None])
        if cache is not None:
            cross_kv, cross_mask = cache.cross_kv, cache.cross_mask
        elif mode == "text":
            cross_kv, cross_mask = None, None
        else:
            if encoder_states is None:
                raise ValueError(f"mode {mode!r} needs encoder_states (image or question states)")
            if self.twin:
                if len(encoder_states) != 2 or any(e.shape[0] != input_ids.shape[0] for e in encoder_states):
                    raise ValueError("the two-image encoder needs a pair of image states, one row per text each")
                masks = (None, None) if encoder_mask is None else encoder_mask
                cross_kv, cross_mask = self.cross_kv(encoder_states), tuple(key_padding_mask(m) for m in masks)
            elif input_ids.shape[0] % encoder_states.shape[0]:
                raise ValueError("the number of text rows must be a multiple of the number of image rows")
            else:
                cross_kv, cross_mask = self.cross_kv(encoder_states), key_padding_mask(encoder_mask)
        for i, layer in enumerate(self.layers):
            cross = cross_kv if cross_kv is None or isinstance(cross_kv, RawStates) else cross_kv[i]
            x = layer(x, self_mask, cross, cross_mask, cache, i, causal)
        if cache is not None:
            cache.length += t
        return x


class PredictionTransform(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.dense = packed.Linear(cfg.width, cfg.width)
        self.LayerNorm = nn.LayerNorm(cfg.width, eps=cfg.layer_norm_eps)

    def forward(self, x):
        return self.LayerNorm(F.gelu(self.dense(x)))


class Predictions(nn.Module):
    """LM head; `decoder.weight` is tied to the word embeddings, `bias` is `decoder.bias`."""

    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.transform = PredictionTransform(cfg)
        self.bias = nn.Parameter(torch.zeros(cfg.rows))
        self.decoder = packed.Linear(cfg.width, cfg.rows, bias=False)
        self.decoder.bias = self.bias

    def forward(self, x):
        return self.decoder(self.transform(x))


class _LMHead(nn.Module):
    """`forward`: logits over every token id. `rows` and `target_rows`: the head's own rows, which is what a
    loss should use — the same thing unless the vocabulary is trimmed, when they skip the ids it lacks."""

    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.predictions = Predictions(cfg)
        self.vocab_size = cfg.vocab_size
        ids = None if cfg.vocab_ids is None else torch.tensor(cfg.vocab_ids, dtype=torch.long, device="cpu")
        self.register_buffer("row_ids", ids, persistent=False)  # row -> token id
        self.register_buffer("id_rows", _id_rows(cfg), persistent=False)

    def rows(self, x):
        return self.predictions(x)

    def target_rows(self, targets: torch.Tensor) -> torch.Tensor:
        """Token-id targets as row targets (-100, ignored, stays -100); an id the vocabulary lacks is [UNK]'s row."""
        if self.id_rows is None:
            return targets
        return torch.where(targets < 0, targets, self.id_rows[targets.clamp(min=0)])

    def forward(self, x):
        logits = self.predictions(x)
        if self.row_ids is None:
            return logits
        full = logits.new_full((*logits.shape[:-1], self.vocab_size), float("-inf"))
        return full.index_copy_(-1, self.row_ids, logits)


class TextDecoder(nn.Module):
    """Image-grounded (or question-grounded) causal decoder with its LM head."""

    def __init__(self, cfg: TextConfig, cross_width: int):
        super().__init__()
        self.bert = TextTransformer(cfg, cross_width)
        self.cls = _LMHead(cfg)
        self.cls.predictions.decoder.weight = self.bert.embeddings.word_embeddings.weight

    def forward(self, input_ids, attention_mask=None, encoder_states=None, encoder_mask=None):
        """Logits (R, T, vocab) of teacher-forced decoding."""
        hidden = self.bert(input_ids, attention_mask, encoder_states, encoder_mask, mode="causal")
        return self.cls(hidden)

    def lm_loss(self, input_ids, attention_mask, encoder_states, encoder_mask=None, prompt_length: int = 0,
                label_smoothing: float = 0.1, reduction: str = "mean") -> torch.Tensor:
        """Shifted next-token cross-entropy, pads ignored, the first prompt_length targets ignored.
        reduction="none" sums per sequence (the official VQA/rank scoring)."""
        hidden = self.bert(input_ids, attention_mask, encoder_states, encoder_mask, mode="causal")
        targets = self.cls.target_rows(input_ids.masked_fill(attention_mask == 0, -100)[:, 1:])
        if prompt_length:
            targets[:, : prompt_length - 1] = -100
        keep = targets != -100  # the LM head only runs where there is a target (a short answer: a few of T)
        loss = F.cross_entropy(self.cls.rows(hidden[:, :-1][keep]).float(), targets[keep],
                               label_smoothing=label_smoothing, reduction="none")
        if reduction == "none":
            rows = keep.nonzero()[:, 0]
            return loss.new_zeros(input_ids.shape[0]).index_add_(0, rows, loss)
        return loss.sum() / keep.sum().clamp(min=1)

    def start(self, encoder_states: torch.Tensor, encoder_mask: torch.Tensor | None = None,
              absorb: bool = False) -> "DecoderState":
        return DecoderState(self, encoder_states, encoder_mask, absorb)

    def absorb_pays(self, rows_per_item: int, new_tokens: int) -> bool:
        """Whether `start(absorb=True)` is the faster choice. Projecting K/V costs about head_dim times
        one row-step of the absorbed attention; measured on `base` at 384 px (CPU), absorbed wins for
        greedy/sampling (1.9 vs 1.2 s for 8 images, 16 tokens) and beam 3 (2.3 vs 1.9 s), ties at beam 5
        and loses at beam 8, so the break-even is about rows x tokens = head_dim. Off the CPU the projected
        keys/values win: on an H100 (`base`, 8 images, 16 tokens) greedy took 86 ms projected against 123 ms
        absorbed, beam 3 114 against 158 ms."""
        cfg = self.bert.cfg
        on_cpu = next(self.parameters()).device.type == "cpu"
        return on_cpu and rows_per_item * new_tokens <= cfg.width // cfg.heads


class DecoderState:
    """Incremental decoding for `blip.generation.generate`: feeds new tokens, keeps the self-attention
    cache, and keeps ONE copy of each item's cross-attention inputs however many beams it has: the
    projected keys/values of every layer, or with `absorb=True` only the raw states, attended through
    the key/value weights (`AttentionProjections.absorbed`; cheaper when few rows are decoded)."""

    def __init__(self, decoder: TextDecoder, encoder_states: torch.Tensor, encoder_mask: torch.Tensor | None,
                 absorb: bool = False):
        self.decoder = decoder
        cross = RawStates.of(encoder_states) if absorb else decoder.bert.cross_kv(encoder_states)
        self.cache = KVCache(cross, key_padding_mask(encoder_mask))
        self.rows = encoder_states.shape[0]
        self.groups = encoder_states.shape[0]
        self.device = encoder_states.device

    def __call__(self, input_ids: torch.Tensor) -> torch.Tensor:
        with packed.decoding(input_ids.shape[0]):  # few rows a step: weights stream faster from oneDNN's packed layout
            hidden = self.decoder.bert(input_ids, mode="causal", cache=self.cache)
            return self.decoder.cls(hidden[:, -1]).float()

    def reorder(self, rows: torch.Tensor, groups: int) -> None:
        rows = rows.to(self.device)
        per_old = self.rows // self.groups
        per_new = rows.numel() // groups
        keep = rows.view(groups, per_new)[:, 0] // per_old
        if groups != self.groups or not torch.equal(keep, torch.arange(groups, device=keep.device)):
            cross = self.cache.cross_kv
            self.cache.cross_kv = cross.select(keep) if isinstance(cross, RawStates) else [(k[keep], v[keep]) for k, v in cross]
            if self.cache.cross_mask is not None:
                self.cache.cross_mask = self.cache.cross_mask[keep]
        if self.cache.buffers and not (rows.numel() == self.rows and torch.equal(rows, torch.arange(self.rows, device=rows.device))):
            self.cache.select(rows)
        self.rows, self.groups = rows.numel(), groups


def init_bert_weights(module: nn.Module, std: float = 0.02) -> None:
    """BERT initialisation: normal(0, 0.02) weights, zero biases, unit LayerNorm. Nothing on the meta
    device (weights about to be loaded; see _Embedding)."""
    if any(p.is_meta for p in module.parameters()):
        return
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, std=std)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, std=std)
            if m.padding_idx is not None:
                with torch.no_grad():
                    m.weight[m.padding_idx].zero_()
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
