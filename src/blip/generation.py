"""One text-generation routine for every BLIP text decoder (captioning, VQA answer generation).

`generate` drives a model-agnostic :class:`DecoderState` (a decoder with a self-attention KV cache) through greedy
search, nucleus/top-k sampling or beam search.

Two beam-search scoring rules are available (``GenerationConfig.length_normalization``):

``"full"``
    transformers 4.15 (``generation_utils.beam_search`` + ``generation_beam_search.BeamSearchScorer`` /
    ``BeamHypotheses``), which produced the official BLIP numbers: the top ``2 * num_beams`` candidates are taken
    from the processed log-probs, an EOS candidate becomes a finished hypothesis only if its rank is
    ``< num_beams``; the hypothesis is the sequence *without* the EOS (prompt included) and scores
    ``sum_logprobs / len(hyp) ** length_penalty``; the next beams are the first ``num_beams`` non-EOS candidates;
    an item is done once it holds ``num_beams`` hypotheses and its worst one is ``>=`` the best candidate's
    ``sum_logprobs / cur_len ** length_penalty``; at ``max_length`` the running beams of unfinished items are added
    as hypotheses; the EOS is appended to the returned sequence when it is shorter than ``max_length``.

``"generated"``
    the installed transformers 5.x ``GenerationMixin._beam_search`` (``_get_top_k_continuations``,
    ``_get_running_beams_for_next_iteration``, ``_update_finished_beams``, ``_check_early_stop_heuristic``) with
    ``early_stopping=False``: finished candidates are scored by ``sum_logprobs / generated_len ** length_penalty``
    (generated length includes the EOS, excludes the prompt), only the top ``num_beams`` of the ``2 * num_beams``
    candidates may finish, and an item stops improving once its best running beam (divided by the current generated
    length) cannot beat the worst of its ``num_beams`` finished hypotheses.

Greedy search and sampling are identical in both modes (and in both transformers versions): logits processors
(repetition penalty, then min length) act on the raw logits; sampling then applies temperature -> top-k -> top-p,
softmax and ``torch.multinomial(probs, 1)``. Finished rows are padded with ``pad_token_id``.

Lengths (``max_length``, ``min_length``) count the prompt; the repetition penalty covers the prompt too.

Finished items are dropped from the decoder state ("pruning") with :meth:`DecoderState.reorder`; this never
changes the output (for sampling the random stream is consumed exactly as without pruning).

Known difference from transformers 5.x: its beam search fills the tail of short outputs with ``eos_token_id``
when ``pad_token_id == 0`` (``pad_token_tensor or eos`` in ``_beam_search``); here outputs are always padded with
``pad_token_id``. Tokens up to each row's EOS are identical.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F

__all__ = ["DecoderState", "GenerationConfig", "generate"]

_NEG = -1.0e9  # transformers' "very large negative" score for masked beams


class DecoderState(Protocol):
    """A text decoder bound to its inputs (e.g. image embeddings), holding a self-attention KV cache."""

    def __call__(self, input_ids: torch.LongTensor) -> torch.Tensor:
        """Feed new tokens ``(R, t)`` for the R current rows and append them to the cache.

        Returns float logits of the last position, shape ``(R, V)``."""
        ...

    def reorder(self, rows: torch.LongTensor, groups: int) -> None:
        """Make new row ``j`` a copy of current row ``rows[j]`` (selection, duplication, reordering).

        The new rows form ``groups`` contiguous blocks of equal size; block ``i`` holds rows that all descend from
        the same input item, in input order among the items still alive."""
        ...


@dataclass
class GenerationConfig:
    num_beams: int = 1
    max_length: int = 20  # counts ALL tokens, prompt included (official BLIP / transformers 4.15 semantics)
    min_length: int = 0  # likewise counts the prompt
    do_sample: bool = False
    top_p: float = 1.0
    top_k: int = 50  # used only when sampling; 0 disables it
    temperature: float = 1.0
    repetition_penalty: float = 1.0
    length_penalty: float = 1.0
    length_normalization: str = "full"  # "full" (transformers 4.15) or "generated" (transformers >= 4.5x / 5.x)
    eos_token_id: int = 102
    pad_token_id: int = 0

    def validate(self, prompt_length: int | None = None) -> None:
        """Raise ``ValueError`` for any inconsistent setting."""

        def is_int(v: object) -> bool:
            return isinstance(v, int) and not isinstance(v, bool)

        def is_num(v: object) -> bool:
            return isinstance(v, (int, float)) and not isinstance(v, bool)

        if not is_int(self.num_beams) or self.num_beams < 1:
            raise ValueError(f"num_beams must be an integer >= 1, got {self.num_beams!r}")
        if not is_int(self.max_length) or self.max_length < 1:
            raise ValueError(f"max_length must be a positive integer, got {self.max_length!r}")
        if not is_int(self.min_length) or self.min_length < 0:
            raise ValueError(f"min_length must be an integer >= 0, got {self.min_length!r}")
        if not isinstance(self.do_sample, bool):
            raise ValueError(f"do_sample must be a bool, got {self.do_sample!r}")
        if not is_num(self.top_p) or not (0.0 < self.top_p <= 1.0):
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if not is_int(self.top_k) or self.top_k < 0:
            raise ValueError(f"top_k must be an integer >= 0 (0 disables it), got {self.top_k!r}")
        if not is_num(self.temperature) or not (self.temperature > 0.0):
            raise ValueError(f"temperature must be > 0, got {self.temperature!r}")
        if not is_num(self.repetition_penalty) or not (self.repetition_penalty > 0.0):
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty!r}")
        if not is_num(self.length_penalty) or not math.isfinite(self.length_penalty):
            raise ValueError(f"length_penalty must be a finite number, got {self.length_penalty!r}")
        if self.length_normalization not in ("full", "generated"):
            raise ValueError(
                f"length_normalization must be 'full' or 'generated', got {self.length_normalization!r}"
            )
        if not is_int(self.eos_token_id) or self.eos_token_id < 0:
            raise ValueError(f"eos_token_id must be an integer >= 0, got {self.eos_token_id!r}")
        if not is_int(self.pad_token_id) or self.pad_token_id < 0:
            raise ValueError(f"pad_token_id must be an integer >= 0, got {self.pad_token_id!r}")
        if self.do_sample and self.num_beams > 1:
            raise ValueError("beam sampling (do_sample=True with num_beams > 1) is not supported")
        if prompt_length is not None and self.max_length <= prompt_length:
            raise ValueError(
                f"max_length ({self.max_length}) counts the prompt and must exceed the prompt length ({prompt_length})"
            )


# ----------------------------------------------------------------------------------------------------------------
# logits processors (same order and arithmetic as transformers' _get_logits_processor)


def _process(sequences: torch.Tensor, scores: torch.Tensor, cfg: GenerationConfig) -> torch.Tensor:
    """Repetition penalty then min length. ``sequences`` (R, cur_len) is everything so far, prompt included."""
    if cfg.repetition_penalty != 1.0:
        # RepetitionPenaltyLogitsProcessor: once per distinct token, negative scores multiplied, positive divided
        score = torch.gather(scores, 1, sequences)
        score = torch.where(score < 0, score * cfg.repetition_penalty, score / cfg.repetition_penalty)
        scores = scores.scatter(1, sequences, score)
    if sequences.shape[-1] < cfg.min_length:
        # MinLengthLogitsProcessor (length includes the prompt)
        scores = scores.clone()
        scores[:, cfg.eos_token_id] = -float("inf")
    return scores


def _warp(scores: torch.Tensor, cfg: GenerationConfig) -> torch.Tensor:
    """Sampling warpers in transformers' order: temperature -> top-k -> top-p (min_tokens_to_keep=1)."""
    if cfg.temperature != 1.0:
        scores = scores / cfg.temperature
    if cfg.top_k != 0:
        top_k = min(cfg.top_k, scores.shape[-1])
        kth = torch.topk(scores, top_k)[0][..., -1, None]
        scores = scores.masked_fill(scores < kth, -float("inf"))
    if cfg.top_p < 1.0:
        # TopPLogitsWarper (transformers 5.x formulation)
        sorted_logits, sorted_indices = torch.sort(scores, descending=False)
        cumulative_probs = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        sorted_to_remove = cumulative_probs <= (1 - cfg.top_p)
        sorted_to_remove[..., -1:] = False
        to_remove = sorted_to_remove.scatter(1, sorted_indices, sorted_to_remove)
        scores = scores.masked_fill(to_remove, -float("inf"))
    return scores


# ----------------------------------------------------------------------------------------------------------------


def _step(state: DecoderState, tokens: torch.Tensor, rows: int) -> torch.Tensor:
    logits = state(tokens)
    if not isinstance(logits, torch.Tensor) or logits.dim() != 2 or logits.shape[0] != rows:
        shape = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
        raise RuntimeError(f"decoder state returned logits of shape {shape}, expected ({rows}, vocab_size)")
    return logits.float()


def _check_vocab(cfg: GenerationConfig, vocab_size: int) -> None:
    if cfg.eos_token_id >= vocab_size or cfg.pad_token_id >= vocab_size:
        raise ValueError(
            f"eos_token_id ({cfg.eos_token_id}) and pad_token_id ({cfg.pad_token_id}) must be < vocab size "
            f"({vocab_size})"
        )
    if 2 * cfg.num_beams > vocab_size:
        raise ValueError(f"num_beams ({cfg.num_beams}) must be at most half the vocab size ({vocab_size})")


def generate(
    state: DecoderState,
    input_ids: torch.LongTensor,
    config: GenerationConfig,
    generator: torch.Generator | list[torch.Generator] | None = None,
    *,
    prune: bool = True,
) -> torch.LongTensor:
    """Generate continuations of ``input_ids`` (B, P) (same prompt length for all rows, no padding).

    Returns (B, L) sequences including the prompt, padded with ``pad_token_id`` after EOS, ``L <= max_length``.
    ``state`` must be fresh (empty cache) and bound to the B input items; it is consumed. ``generator`` (sampling
    only) defaults to the global torch RNG; a list of B generators draws row i's tokens from generator i alone, so a
    row's sample does not depend on its batch-mates (CapFilt seeds one per image). ``prune=False`` keeps finished
    rows in the decoder (same output, more compute; for testing).
    """
    if not isinstance(config, GenerationConfig):
        raise ValueError(f"config must be a GenerationConfig, got {type(config).__name__}")
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
        raise ValueError("input_ids must be a 2-D LongTensor (batch, prompt_length)")
    if input_ids.dtype != torch.long:
        raise ValueError(f"input_ids must have dtype torch.long, got {input_ids.dtype}")
    if input_ids.shape[0] < 1 or input_ids.shape[1] < 1:
        raise ValueError(f"input_ids must hold at least one row and one token, got shape {tuple(input_ids.shape)}")
    if isinstance(generator, (list, tuple)):
        if len(generator) != input_ids.shape[0] or not all(isinstance(g, torch.Generator) for g in generator):
            raise ValueError(f"a generator list needs one torch.Generator per row ({input_ids.shape[0]}), "
                             f"got {len(generator)} entries")
    elif generator is not None and not isinstance(generator, torch.Generator):
        raise ValueError(f"generator must be a torch.Generator, a list of them, or None, got {type(generator).__name__}")
    config.validate(prompt_length=input_ids.shape[1])
    if bool((input_ids < 0).any()):
        raise ValueError("input_ids must be non-negative token ids")

    with torch.inference_mode():
        if config.num_beams == 1:
            return _greedy_or_sample(state, input_ids, config, generator, prune)
        if config.length_normalization == "generated":
            return _beam_search_generated(state, input_ids, config, prune)
        return _beam_search_full(state, input_ids, config, prune)


# ----------------------------------------------------------------------------------------------------------------
# greedy search / sampling (transformers 5.x `_sample`, identical to 4.15 `greedy_search` / `sample`)


def _greedy_or_sample(
    state: DecoderState,
    input_ids: torch.Tensor,
    cfg: GenerationConfig,
    generator: torch.Generator | list[torch.Generator] | None,
    prune: bool,
) -> torch.Tensor:
    B, P = input_ids.shape
    logits = _step(state, input_ids, B)
    _check_vocab(cfg, logits.shape[-1])
    device = logits.device
    gens = generator if isinstance(generator, (list, tuple)) else [generator]
    wrong = next((g.device.type for g in gens if g is not None and g.device.type != device.type), None)
    if cfg.do_sample and wrong is not None:
        raise ValueError(f"generator is on {wrong} but the model runs on {device.type}: "
                         f"pass torch.Generator(device={device.type!r})")
    seqs = torch.full((B, cfg.max_length), cfg.pad_token_id, dtype=torch.long, device=device)
    seqs[:, :P] = input_ids.to(device)
    rows = torch.arange(B, device=device)  # original index of each state row
    unfinished = torch.ones(B, dtype=torch.bool, device=device)  # per state row
    cur_len = P
    while True:
        scores = _process(seqs[rows, :cur_len], logits, cfg)
        if cfg.do_sample:
            probs = F.softmax(_warp(scores, cfg), dim=-1)
            tokens = _multinomial(probs, rows, B, generator)
        else:
            tokens = torch.argmax(scores, dim=-1)
        tokens = torch.where(unfinished, tokens, cfg.pad_token_id)
        seqs[rows, cur_len] = tokens
        cur_len += 1
        unfinished = unfinished & (tokens != cfg.eos_token_id)
        if cur_len >= cfg.max_length or not bool(unfinished.any()):
            break
        if prune and not bool(unfinished.all()):
            keep = unfinished.nonzero().squeeze(1)
            state.reorder(keep, groups=int(keep.numel()))
            rows, unfinished, tokens = rows[keep], unfinished[keep], tokens[keep]
        logits = _step(state, tokens[:, None], rows.numel())
    return seqs[:, :cur_len]


def _multinomial(probs: torch.Tensor, rows: torch.Tensor, batch: int,
                 generator: torch.Generator | list[torch.Generator] | None) -> torch.Tensor:
    """One token per row of ``probs`` (R, V), exactly as ``torch.multinomial(full, 1)`` draws it for the (batch, V)
    tensor ``full`` whose rows ``rows`` are ``probs`` (the other rows have finished): pruning must consume the random
    stream as the unpruned batch does.

    torch.multinomial(p, 1) is argmax(p / q) with q ~ Exp(1), one per element, and the CPU fills q in a serial loop
    (6 ms a step for 8 x 30524, most of sampling's extra cost). The same q are -log1p(-u) of a float64 ``uniform_``
    (the same draws from the generator) and come 3x faster vectorised; `_exponentials_match` checks that against
    ``exponential_`` itself on this torch build, once per size, and anything it does not vouch for (another build,
    CUDA, another dtype) keeps torch.multinomial.

    With a list of generators (one per input row), see `_multinomial_per_row`."""
    if isinstance(generator, (list, tuple)):
        return _multinomial_per_row(probs, [generator[i] for i in rows.tolist()])
    shape = (batch, probs.shape[-1])
    if probs.device.type == "cpu" and _exponentials_match(shape[0] * shape[1], probs.dtype):
        if not bool((probs.max() < math.inf) & (probs.min() >= 0)):  # torch.multinomial's own checks
            raise RuntimeError("probability tensor contains either `inf`, `nan` or element < 0")
        if bool((probs.sum(-1) == 0).any()):
            raise RuntimeError("invalid multinomial distribution (sum of probabilities <= 0)")
        u = torch.empty(shape, dtype=torch.float64).uniform_(generator=generator)
        u = u if rows.numel() == batch else u[rows]
        return (probs / torch.log1p(u.neg_()).neg_().to(probs.dtype)).argmax(-1)
    if rows.numel() == batch:
        return torch.multinomial(probs, num_samples=1, generator=generator).squeeze(1)
    full = torch.zeros(shape, dtype=probs.dtype, device=probs.device)
    full[:, 0] = 1.0
    full[rows] = probs
    return torch.multinomial(full, num_samples=1, generator=generator).squeeze(1)[rows]


def _multinomial_per_row(probs: torch.Tensor, generators: list[torch.Generator]) -> torch.Tensor:
    """Row j's token drawn from generators[j] alone: argmax(p / q) with q = -log1p(-u) ~ Exp(1), u a float64
    ``uniform_`` of the vocabulary size from that generator (an exact draw from p). On the CPU in float32 this is
    what ``torch.multinomial(probs[j:j+1], 1, generator=generators[j])`` draws (see `_multinomial`), so a row gets
    the token it would get in a batch of one; on CUDA it costs one ``uniform_`` launch a row, not a multinomial."""
    v = probs.shape[-1]
    if not bool((probs.max() < math.inf) & (probs.min() >= 0)):
        raise RuntimeError("probability tensor contains either `inf`, `nan` or element < 0")
    if bool((probs.sum(-1) == 0).any()):
        raise RuntimeError("invalid multinomial distribution (sum of probabilities <= 0)")
    u = torch.stack([torch.empty(v, dtype=torch.float64, device=probs.device).uniform_(generator=g) for g in generators])
    return (probs / torch.log1p(u.neg_()).neg_().to(probs.dtype)).argmax(-1)


_EXPONENTIALS_MATCH: dict[tuple[int, torch.dtype], bool] = {}


def _exponentials_match(n: int, dtype: torch.dtype) -> bool:
    """Whether ``exponential_`` on n CPU elements of ``dtype`` equals -log1p(-u) of a float64 ``uniform_`` of n
    elements and leaves the generator in the same state (so `_multinomial` may draw its q that way)."""
    key = (n, dtype)
    if key not in _EXPONENTIALS_MATCH:
        ok = dtype == torch.float32
        if ok:
            a, b = torch.Generator().manual_seed(20220128), torch.Generator().manual_seed(20220128)
            want = torch.empty(n, dtype=dtype).exponential_(generator=a)
            u = torch.empty(n, dtype=torch.float64).uniform_(generator=b)
            ok = torch.equal(want, torch.log1p(u.neg_()).neg_().to(dtype)) and torch.equal(a.get_state(), b.get_state())
        _EXPONENTIALS_MATCH[key] = ok
    return _EXPONENTIALS_MATCH[key]


# ----------------------------------------------------------------------------------------------------------------
# beam search, transformers 5.x rules ("generated")


def _gather_beams(tensor: torch.Tensor, beam_indices: torch.Tensor) -> torch.Tensor:
    while beam_indices.dim() < tensor.dim():
        beam_indices = beam_indices.unsqueeze(-1)
    return torch.take_along_dim(tensor, beam_indices, dim=1)


def _start_beams(state: DecoderState, input_ids: torch.Tensor, cfg: GenerationConfig):
    """Run the prompt once per item, then expand the state (and its logits) to num_beams rows each."""
    B, K = input_ids.shape[0], cfg.num_beams
    logits = _step(state, input_ids, B)
    _check_vocab(cfg, logits.shape[-1])
    state.reorder(torch.arange(B, device=logits.device).repeat_interleave(K), groups=B)
    return logits.repeat_interleave(K, dim=0), logits.shape[-1], logits.device


def _beam_search_generated(
    state: DecoderState, input_ids: torch.Tensor, cfg: GenerationConfig, prune: bool
) -> torch.Tensor:
    B, P = input_ids.shape
    K, max_length, lp = cfg.num_beams, cfg.max_length, cfg.length_penalty
    logits, V, device = _start_beams(state, input_ids, cfg)

    items = torch.arange(B, device=device)  # original index of each alive item
    running_seq = torch.full((B, K, max_length), cfg.pad_token_id, dtype=torch.long, device=device)
    running_seq[:, :, :P] = input_ids.to(device)[:, None, :]
    running_scores = torch.zeros((B, K), dtype=torch.float, device=device)
    running_scores[:, 1:] = _NEG
    fin_seq = running_seq.clone()
    fin_scores = torch.full((B, K), _NEG, dtype=torch.float, device=device)
    fin_flag = torch.zeros((B, K), dtype=torch.bool, device=device)
    fin_len = torch.full((B, K), P, dtype=torch.long, device=device)
    improvable = torch.ones((B, 1), dtype=torch.bool, device=device)  # is_early_stop_heuristic_unsatisfied
    top_k_mask = torch.cat([torch.ones(K, dtype=torch.bool), torch.zeros(K, dtype=torch.bool)]).to(device)

    out = torch.full((B, max_length), cfg.pad_token_id, dtype=torch.long, device=device)
    out_len = torch.zeros(B, dtype=torch.long, device=device)

    def emit(sel: torch.Tensor) -> None:
        idx = items[sel]
        out[idx] = fin_seq[sel, 0]
        out_len[idx] = fin_len[sel, 0]

    cur_len = P
    while True:
        m = items.numel()
        log_probs = F.log_softmax(logits, dim=-1)
        log_probs = _process(running_seq[:, :, :cur_len].reshape(m * K, cur_len), log_probs, cfg)
        log_probs = (log_probs.view(m, K, V) + running_scores[:, :, None]).reshape(m, K * V)

        # _get_top_k_continuations
        topk_log_probs, topk_indices = torch.topk(log_probs, k=2 * K)
        topk_src = topk_indices // V
        topk_ids = topk_indices % V
        topk_seq = _gather_beams(running_seq, topk_src)
        topk_seq[:, :, cur_len] = topk_ids
        # stopping criteria on the candidates: EOS or max length (MaxLengthCriteria / EosTokenCriteria)
        hits = (topk_ids == cfg.eos_token_id) | (cur_len + 1 >= max_length)

        # _get_running_beams_for_next_iteration
        topk_running_log_probs = topk_log_probs + hits.to(torch.float32) * _NEG
        next_idx = torch.topk(topk_running_log_probs, k=K)[1]
        running_seq = _gather_beams(topk_seq, next_idx)
        running_scores = _gather_beams(topk_running_log_probs, next_idx)
        running_src = _gather_beams(topk_src, next_idx)

        # _update_finished_beams (early_stopping=False)
        just_finished = hits & top_k_mask[None, :]
        cand = topk_log_probs / ((cur_len + 1 - P) ** lp)
        cand += (~improvable).to(torch.float32) * _NEG
        cand += (~just_finished) * _NEG
        merged_scores = torch.cat((fin_scores, cand), dim=1)
        keep_idx = torch.topk(merged_scores, k=K)[1]
        fin_seq = _gather_beams(torch.cat((fin_seq, topk_seq), dim=1), keep_idx)
        fin_scores = _gather_beams(merged_scores, keep_idx)
        fin_flag = _gather_beams(torch.cat((fin_flag, just_finished), dim=1), keep_idx)
        new_len = torch.full_like(topk_src, cur_len + 1)
        fin_len = _gather_beams(torch.cat((fin_len, new_len), dim=1), keep_idx)

        cur_len += 1
        # _check_early_stop_heuristic (early_stopping=False: best hypothetical length = current generated length)
        best_possible = running_scores[:, :1] / ((cur_len - P) ** lp)
        worst_finished = torch.where(fin_flag, torch.min(fin_scores, dim=1, keepdim=True)[0], _NEG)
        improvable = improvable & torch.any(best_possible > worst_finished, dim=-1, keepdim=True)

        # every candidate hits max_length at the last step; otherwise stop once no item can improve
        if cur_len >= max_length or not bool(improvable.any()):
            break
        beam_rows = torch.arange(m, device=device)[:, None] * K + running_src
        if prune and not bool(improvable.all()):
            # an item that cannot improve has frozen finished beams: emit it and drop its rows
            frozen = ~improvable[:, 0]
            emit(frozen)
            keep = improvable[:, 0].nonzero().squeeze(1)
            items, running_seq, running_scores = items[keep], running_seq[keep], running_scores[keep]
            fin_seq, fin_scores, fin_flag, fin_len = fin_seq[keep], fin_scores[keep], fin_flag[keep], fin_len[keep]
            improvable, beam_rows = improvable[keep], beam_rows[keep]
        state.reorder(beam_rows.reshape(-1), groups=int(items.numel()))
        logits = _step(state, running_seq[:, :, cur_len - 1].reshape(-1, 1), items.numel() * K)

    emit(torch.ones(items.numel(), dtype=torch.bool, device=device))
    return out[:, : int(out_len.max())]


# ----------------------------------------------------------------------------------------------------------------
# beam search, transformers 4.15 rules ("full")


class _Hypotheses:
    """transformers 4.15 ``BeamHypotheses`` (n-best list; same tie-breaking), early_stopping=False."""

    def __init__(self, num_beams: int, length_penalty: float):
        self.num_beams = num_beams
        self.length_penalty = length_penalty
        self.beams: list[tuple[float, torch.Tensor]] = []
        self.worst_score = 1e9

    def __len__(self) -> int:
        return len(self.beams)

    def add(self, hyp: torch.Tensor, sum_logprobs: float) -> None:
        score = sum_logprobs / (hyp.shape[-1] ** self.length_penalty)
        if len(self) < self.num_beams or score > self.worst_score:
            self.beams.append((score, hyp))
            if len(self) > self.num_beams:
                sorted_scores = sorted([(s, idx) for idx, (s, _) in enumerate(self.beams)])
                del self.beams[sorted_scores[0][1]]
                self.worst_score = sorted_scores[1][0]
            else:
                self.worst_score = min(score, self.worst_score)

    def best(self) -> torch.Tensor:
        return sorted(self.beams, key=lambda x: x[0])[-1][1]


def _beam_search_full(state: DecoderState, input_ids: torch.Tensor, cfg: GenerationConfig, prune: bool) -> torch.Tensor:
    B, P = input_ids.shape
    K, max_length, lp = cfg.num_beams, cfg.max_length, cfg.length_penalty
    logits, V, device = _start_beams(state, input_ids, cfg)

    items = torch.arange(B, device=device)
    items_cpu = list(range(B))
    running_seq = torch.full((B, K, max_length), cfg.pad_token_id, dtype=torch.long, device=device)
    running_seq[:, :, :P] = input_ids.to(device)[:, None, :]
    beam_scores = torch.zeros((B, K), dtype=torch.float, device=device)
    beam_scores[:, 1:] = _NEG
    hyps = [_Hypotheses(K, lp) for _ in range(B)]
    n_hyps = torch.zeros(B, dtype=torch.long)  # CPU mirrors of the per-item stores (for a vectorised is_done)
    worst = torch.full((B,), 1e9, dtype=torch.float64)
    done = torch.zeros(B, dtype=torch.bool)  # per alive item, CPU
    rank_lt_k = (torch.arange(2 * K, device=device) < K)[None, :]

    cur_len = P
    while True:
        m = len(items_cpu)
        scores = F.log_softmax(logits, dim=-1)
        scores = _process(running_seq[:, :, :cur_len].reshape(m * K, cur_len), scores, cfg)
        scores = (scores + beam_scores.reshape(-1, 1)).view(m, K * V)
        next_scores, next_ids = torch.topk(scores, 2 * K, dim=1, largest=True, sorted=True)
        src = next_ids // V
        tok = next_ids % V
        is_eos = tok == cfg.eos_token_id

        # EOS candidates ranked < num_beams become hypotheses (without the EOS), in rank order
        add = is_eos & rank_lt_k
        if not prune:
            add &= ~done.to(device)[:, None]
        if bool(add.any()):
            pairs = add.nonzero().tolist()
            add_src = src[add].tolist()
            add_scores = next_scores[add].tolist()
            for (p, _), s, sc in zip(pairs, add_src, add_scores):
                b = items_cpu[p]
                hyps[b].add(running_seq[p, s, :cur_len].clone(), sc)
                n_hyps[b] = len(hyps[b])
                worst[b] = hyps[b].worst_score

        # the next beams are the first num_beams non-EOS candidates in rank order
        non_eos = ~is_eos
        sel = non_eos & (non_eos.cumsum(dim=1) <= K)
        sel_idx = sel.nonzero()[:, 1].view(m, K)
        beam_scores = torch.gather(next_scores, 1, sel_idx)
        new_tok = torch.gather(tok, 1, sel_idx)
        new_src = torch.gather(src, 1, sel_idx)
        running_seq = _gather_beams(running_seq, new_src)
        running_seq[:, :, cur_len] = new_tok

        # BeamHypotheses.is_done(best candidate sum_logprobs, cur_len) in double precision, as in 4.15
        best = next_scores.max(dim=1).values.cpu().double()
        idx = torch.tensor(items_cpu, dtype=torch.long)
        done = done | ((n_hyps[idx] >= K) & (worst[idx] >= best / (cur_len**lp)))
        cur_len += 1
        if cur_len >= max_length or bool(done.all()):
            break
        beam_rows = torch.arange(m, device=device)[:, None] * K + new_src
        if prune and bool(done.any()):
            keep_cpu = (~done).nonzero().squeeze(1)
            keep = keep_cpu.to(device)
            items_cpu = [items_cpu[i] for i in keep_cpu.tolist()]
            items, running_seq, beam_scores = items[keep], running_seq[keep], beam_scores[keep]
            beam_rows, done = beam_rows[keep], done[keep_cpu]
        state.reorder(beam_rows.reshape(-1), groups=len(items_cpu))
        logits = _step(state, running_seq[:, :, cur_len - 1].reshape(-1, 1), len(items_cpu) * K)

    # finalize: running beams of items that are not done become hypotheses
    final_scores = beam_scores.tolist()
    for p, b in enumerate(items_cpu):
        if bool(done[p]):
            continue
        for j in range(K):
            hyps[b].add(running_seq[p, j, :cur_len].clone(), final_scores[p][j])

    best_hyps = [h.best() for h in hyps]
    L = min(max(h.shape[-1] for h in best_hyps) + 1, max_length)
    out = torch.full((B, L), cfg.pad_token_id, dtype=torch.long, device=device)
    for b, h in enumerate(best_hyps):
        n = h.shape[-1]
        out[b, :n] = h
        if n < max_length:
            out[b, n] = cfg.eos_token_id
    return out
