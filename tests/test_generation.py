"""Tests for blip.generation.generate against transformers' own generate (installed 5.x) and a plain
re-implementation of transformers 4.15 beam search, on a tiny random GPT-2 driven through a KV-cache adapter."""

from __future__ import annotations

import dataclasses
import inspect

import pytest
import torch

transformers = pytest.importorskip("transformers")
from transformers import DynamicCache, GPT2Config, GPT2LMHeadModel  # noqa: E402

from blip.generation import GenerationConfig, generate  # noqa: E402

# transformers 5.2x renamed forward's past_key_values to cache; older versions ignore an unknown `cache` keyword
CACHE_ARG = "cache" if "cache" in inspect.signature(GPT2LMHeadModel.forward).parameters else "past_key_values"
V, EOS, PAD, BOS = 48, 2, 1, 3
B, P = 6, 4


@pytest.fixture(autouse=True, scope="module")
def _single_thread():
    # the model is tiny: one intra-op thread is fastest and immune to CPU contention
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def make_model(seed: int, scale: float = 5.0, dtype: torch.dtype = torch.float32) -> GPT2LMHeadModel:
    """Tiny random GPT-2; weights scaled so that distributions are peaked and EOS shows up at varying positions."""
    torch.manual_seed(seed)
    cfg = GPT2Config(
        vocab_size=V, n_positions=64, n_embd=32, n_layer=2, n_head=2, bos_token_id=BOS, eos_token_id=EOS,
        pad_token_id=PAD,
    )
    model = GPT2LMHeadModel(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(scale)
        model.transformer.wte.weight[EOS] *= 1.5  # make EOS a bit more likely (the LM head is tied to wte)
    return model.to(dtype)


def make_prompts(seed: int, batch: int = B, length: int = P) -> torch.Tensor:
    g = torch.Generator().manual_seed(1000 + seed)
    return torch.randint(4, V, (batch, length), generator=g)  # no EOS / PAD / BOS in prompts


class GPT2State:
    """DecoderState adapter over a transformers GPT-2 with a DynamicCache.

    Also checks the reorder contract: new rows come in `groups` contiguous equal blocks, each descending from a
    single input item, items in increasing order."""

    def __init__(self, model: GPT2LMHeadModel):
        self.model = model
        self.cache = DynamicCache()
        self.length = 0
        self.items: torch.Tensor | None = None  # input item of every current row
        self.rows_fed = 0  # total rows fed to the model (measures pruning)
        self.calls = 0

    def __call__(self, input_ids: torch.Tensor) -> torch.Tensor:
        R, t = input_ids.shape
        if self.items is None:
            self.items = torch.arange(R)
        assert R == self.items.numel(), "fed a number of rows different from the state's rows"
        mask = torch.ones(R, self.length + t, dtype=torch.long)
        out = self.model(input_ids=input_ids, attention_mask=mask, use_cache=True, **{CACHE_ARG: self.cache})
        self.length += t
        self.rows_fed += R
        self.calls += 1
        return out.logits[:, -1]

    def reorder(self, rows: torch.Tensor, groups: int) -> None:
        assert rows.dtype == torch.long and rows.dim() == 1
        assert groups >= 1 and rows.numel() % groups == 0
        new_items = self.items[rows]
        blocks = new_items.view(groups, -1)
        assert bool((blocks == blocks[:, :1]).all()), "a block mixes rows from different items"
        assert bool((blocks[1:, 0] > blocks[:-1, 0]).all()), "blocks are not in input order"
        self.items = new_items
        self.cache.reorder_cache(rows)


def run(model, prompts, cfg, generator=None, prune=True, state_out: list | None = None) -> torch.Tensor:
    state = GPT2State(model)
    out = generate(state, prompts, cfg, generator=generator, prune=prune)
    if state_out is not None:
        state_out.append(state)
    return out


def hf_generate(model, prompts, cfg: GenerationConfig) -> torch.Tensor:
    kwargs = dict(
        attention_mask=torch.ones_like(prompts), num_beams=cfg.num_beams, max_length=cfg.max_length,
        min_length=cfg.min_length, repetition_penalty=cfg.repetition_penalty, eos_token_id=cfg.eos_token_id,
        pad_token_id=cfg.pad_token_id, do_sample=cfg.do_sample, length_penalty=cfg.length_penalty,
        early_stopping=False, num_return_sequences=1,
    )
    if cfg.do_sample:
        kwargs.update(top_p=cfg.top_p, top_k=cfg.top_k, temperature=cfg.temperature)
    with torch.no_grad():
        return model.generate(prompts, **kwargs)


def finished_early(out: torch.Tensor, cfg: GenerationConfig) -> int:
    """Number of rows that contain EOS after the prompt before max_length."""
    gen = out[:, P:]
    return int(((gen == cfg.eos_token_id).any(dim=1)).sum())


# ----------------------------------------------------------------------------------------------------------------
# token-identical to the installed transformers generate ("generated" normalisation)

HF_CASES = {
    "greedy": dict(),
    "greedy_min_rep": dict(min_length=9, repetition_penalty=1.3),
    "beam3": dict(num_beams=3),
    "beam3_min_rep11": dict(num_beams=3, min_length=8, repetition_penalty=1.1, max_length=18),
    "beam4_rep13": dict(num_beams=4, repetition_penalty=1.3, max_length=16),
    "beam4_min_lp": dict(num_beams=4, min_length=6, length_penalty=0.6),
    "beam3_lp2": dict(num_beams=3, length_penalty=2.0, max_length=24),
    "sample_top_p": dict(do_sample=True, top_p=0.9),
    "sample_rep_temp_topk": dict(do_sample=True, top_p=0.9, top_k=8, temperature=0.7, repetition_penalty=1.1),
}


@pytest.mark.parametrize("case", list(HF_CASES))
def test_matches_installed_transformers(case):
    cfg = GenerationConfig(
        length_normalization="generated", eos_token_id=EOS, pad_token_id=PAD, **HF_CASES[case]
    )
    early = 0
    for seed in range(4):
        model = make_model(seed)
        prompts = make_prompts(seed)
        if cfg.do_sample:
            torch.manual_seed(seed)
            ref = hf_generate(model, prompts, cfg)
            torch.manual_seed(seed)
            ours = run(model, prompts, cfg)
        else:
            ref = hf_generate(model, prompts, cfg)
            ours = run(model, prompts, cfg)
        assert ours.shape == ref.shape, (case, seed, ours, ref)
        assert torch.equal(ours, ref), (case, seed, ours, ref)
        assert ours.shape[1] <= cfg.max_length
        early += finished_early(ours, cfg)
    # the comparison must exercise sequences that finish with EOS before max_length (and ones that don't)
    assert 0 < early < 4 * B, early


def test_beam_pads_with_pad_token_zero():
    # transformers 5.x fills beam-search outputs with EOS when pad_token_id == 0 (`pad or eos` on a tensor);
    # we always pad with pad_token_id, so compare up to (and including) each row's EOS.
    cfg = GenerationConfig(num_beams=3, length_normalization="generated", eos_token_id=EOS, pad_token_id=0)
    model, prompts = make_model(1), make_prompts(1)
    ours, ref = run(model, prompts, cfg), hf_generate(model, prompts, cfg)
    assert ours.shape == ref.shape
    checked = 0
    for o, r in zip(ours, ref):
        eos = (o[P:] == EOS).nonzero()
        n = P + int(eos[0]) + 1 if len(eos) else o.numel()
        assert torch.equal(o[:n], r[:n])
        assert bool((o[n:] == 0).all())
        checked += len(eos) > 0 and n < o.numel()
    assert checked > 0


# ----------------------------------------------------------------------------------------------------------------
# transformers 4.15 beam search ("full" normalisation), reference written plainly: no cache, full recompute


class RefHyps:
    def __init__(self, num_beams, length_penalty):
        self.num_beams, self.length_penalty = num_beams, length_penalty
        self.beams = []  # list of (score, list_of_tokens)
        self.worst_score = 1e9

    def add(self, hyp, sum_logprobs):
        score = sum_logprobs / (len(hyp) ** self.length_penalty)
        if len(self.beams) < self.num_beams or score > self.worst_score:
            self.beams.append((score, hyp))
            if len(self.beams) > self.num_beams:
                ranked = sorted([(s, i) for i, (s, _) in enumerate(self.beams)])
                del self.beams[ranked[0][1]]
                self.worst_score = ranked[1][0]
            else:
                self.worst_score = min(score, self.worst_score)

    def is_done(self, best_sum_logprobs, cur_len):
        if len(self.beams) < self.num_beams:
            return False
        return self.worst_score >= best_sum_logprobs / cur_len**self.length_penalty


def ref_beam_search_415(model, prompts, cfg: GenerationConfig) -> torch.Tensor:
    K = cfg.num_beams
    batch = prompts.shape[0]
    seqs = [list(map(int, prompts[b])) for b in range(batch) for _ in range(K)]  # batch*K running beams
    beam_scores = [0.0 if k == 0 else -1e9 for _ in range(batch) for k in range(K)]
    hyps = [RefHyps(K, cfg.length_penalty) for _ in range(batch)]
    done = [False] * batch
    cur_len = prompts.shape[1]
    while True:
        with torch.no_grad():
            ids = torch.tensor(seqs)
            logits = model(ids, attention_mask=torch.ones_like(ids)).logits[:, -1].float()
        scores = torch.log_softmax(logits, dim=-1)
        for r, seq in enumerate(seqs):  # repetition penalty, then min length
            if cfg.repetition_penalty != 1.0:
                for tok in set(seq):
                    s = scores[r, tok]
                    scores[r, tok] = s * cfg.repetition_penalty if s < 0 else s / cfg.repetition_penalty
            if cur_len < cfg.min_length:
                scores[r, cfg.eos_token_id] = -float("inf")
        scores = scores + torch.tensor(beam_scores)[:, None]
        scores = scores.view(batch, K * V)
        top_scores, top_ids = torch.topk(scores, 2 * K, dim=1, largest=True, sorted=True)
        new_seqs, new_scores = [], []
        for b in range(batch):
            if done[b]:
                new_seqs += [seqs[b * K] + [cfg.pad_token_id]] * K
                new_scores += [0.0] * K
                continue
            chosen = 0
            for rank in range(2 * K):
                beam, tok = int(top_ids[b, rank]) // V, int(top_ids[b, rank]) % V
                score = float(top_scores[b, rank])
                if tok == cfg.eos_token_id:
                    if rank >= K:
                        continue
                    hyps[b].add(list(seqs[b * K + beam]), score)
                else:
                    new_seqs.append(seqs[b * K + beam] + [tok])
                    new_scores.append(score)
                    chosen += 1
                if chosen == K:
                    break
            done[b] = done[b] or hyps[b].is_done(float(top_scores[b].max()), cur_len)
        seqs, beam_scores = new_seqs, new_scores
        cur_len += 1
        if all(done) or cur_len >= cfg.max_length:
            break
    for b in range(batch):
        if not done[b]:
            for k in range(K):
                hyps[b].add(list(seqs[b * K + k]), beam_scores[b * K + k])
    best = [sorted(h.beams, key=lambda x: x[0])[-1][1] for h in hyps]
    length = min(max(len(h) for h in best) + 1, cfg.max_length)
    out = torch.full((batch, length), cfg.pad_token_id, dtype=torch.long)
    for b, h in enumerate(best):
        out[b, : len(h)] = torch.tensor(h)
        if len(h) < cfg.max_length:
            out[b, len(h)] = cfg.eos_token_id
    return out


FULL_CASES = {
    "beam3": dict(num_beams=3),
    "beam3_blip_caption": dict(num_beams=3, min_length=8, max_length=16),
    "beam4_rep": dict(num_beams=4, repetition_penalty=1.3, max_length=14),
    "beam2_lp": dict(num_beams=2, length_penalty=0.5, repetition_penalty=1.1, max_length=16),
    "beam3_lp2": dict(num_beams=3, length_penalty=2.0, max_length=24),
    "beam2_lp3": dict(num_beams=2, length_penalty=3.0, max_length=20),
    "beam4_lp3": dict(num_beams=4, length_penalty=3.0, max_length=20),
}


@pytest.mark.parametrize("case", list(FULL_CASES))
def test_full_matches_reference_415(case):
    cfg = GenerationConfig(length_normalization="full", eos_token_id=EOS, pad_token_id=PAD, **FULL_CASES[case])
    early = 0
    for seed in range(3):
        # float64 model: cache vs full recompute differences stay far below any score gap
        model = make_model(seed, dtype=torch.float64)
        prompts = make_prompts(seed)
        ref = ref_beam_search_415(model, prompts, cfg)
        ours = run(model, prompts, cfg)
        assert torch.equal(ours, ref), (case, seed, ours, ref)
        early += finished_early(ours, cfg)
    assert 0 < early < 3 * B, early


def test_full_and_generated_differ_somewhere():
    # the two normalisations are different rules; on enough inputs they must disagree at least once
    differ = 0
    for seed in range(4):
        model, prompts = make_model(seed), make_prompts(seed)
        a = run(model, prompts, GenerationConfig(num_beams=3, eos_token_id=EOS, pad_token_id=PAD))
        b = run(
            model, prompts,
            GenerationConfig(num_beams=3, eos_token_id=EOS, pad_token_id=PAD, length_normalization="generated"),
        )
        differ += a.shape != b.shape or not torch.equal(a, b)
    assert differ > 0


# ----------------------------------------------------------------------------------------------------------------
# batching and pruning invariance

MODES = {
    "greedy": dict(min_length=6, repetition_penalty=1.2),
    "sample": dict(do_sample=True, top_p=0.9, repetition_penalty=1.1),
    "beam_full": dict(num_beams=3, min_length=6),
    "beam_generated": dict(num_beams=3, min_length=6, length_normalization="generated"),
    "beam_generated_lp2": dict(num_beams=3, length_penalty=2.0, max_length=24, length_normalization="generated"),
}


def strip(row: torch.Tensor) -> torch.Tensor:
    """Row up to and including its first generated EOS (the whole row if it has none)."""
    eos = (row[P:] == EOS).nonzero()
    return row[: P + int(eos[0]) + 1] if len(eos) else row


@pytest.mark.parametrize("mode", [m for m in MODES if not MODES[m].get("do_sample")])
def test_batched_equals_one_at_a_time(mode):
    # (sampling is excluded: a batch draws from the random stream differently than one row alone)
    cfg = GenerationConfig(eos_token_id=EOS, pad_token_id=0, **MODES[mode])
    model, prompts = make_model(2), make_prompts(2)
    batched = run(model, prompts, cfg)
    for b in range(B):
        single = run(model, prompts[b : b + 1], cfg)
        assert torch.equal(strip(batched[b]), strip(single[0])), (b, batched[b], single[0])
    assert batched.shape[1] == max(strip(r).numel() for r in batched)


@pytest.mark.parametrize("mode", list(MODES))
def test_pruning_does_not_change_output(mode):
    cfg = GenerationConfig(eos_token_id=EOS, pad_token_id=0, **MODES[mode])
    pruned_fewer = 0
    for seed in range(3):
        model, prompts = make_model(seed), make_prompts(seed)
        states: list = []
        torch.manual_seed(seed)
        a = run(model, prompts, cfg, prune=True, state_out=states)
        torch.manual_seed(seed)
        b = run(model, prompts, cfg, prune=False, state_out=states)
        assert torch.equal(a, b), (mode, seed, a, b)
        # pruning really drops rows once items finish (same number of decoding calls)
        pruned_fewer += states[0].rows_fed < states[1].rows_fed
        assert states[0].calls == states[1].calls
    assert pruned_fewer > 0


def test_sampling_generator_and_global_rng():
    cfg = GenerationConfig(do_sample=True, top_p=0.9, eos_token_id=EOS, pad_token_id=PAD)
    model, prompts = make_model(0), make_prompts(0)
    a = run(model, prompts, cfg, generator=torch.Generator().manual_seed(7))
    b = run(model, prompts, cfg, generator=torch.Generator().manual_seed(7))
    c = run(model, prompts, cfg, generator=torch.Generator().manual_seed(8))
    assert torch.equal(a, b)
    assert a.shape != c.shape or not torch.equal(a, c)
    torch.manual_seed(3)
    d = run(model, prompts, cfg)
    torch.manual_seed(3)
    e = run(model, prompts, cfg)
    assert torch.equal(d, e)


def test_per_row_generators_make_each_row_independent_of_its_batch():
    """A list of generators, one per row: row i's sample is the one it gets alone with generator i (and, on the
    CPU, the one a single generator i gives a batch of one), whatever its batch-mates and their order."""
    cfg = GenerationConfig(do_sample=True, top_p=0.9, repetition_penalty=1.1, eos_token_id=EOS, pad_token_id=PAD)
    model, prompts = make_model(2), make_prompts(2)
    gens = lambda seeds: [torch.Generator().manual_seed(s) for s in seeds]  # noqa: E731
    batched = run(model, prompts, cfg, generator=gens(range(10, 10 + B)))
    assert finished_early(batched, cfg) > 0  # pruning happened while other rows went on
    reversed_rows = run(model, prompts.flip(0), cfg, generator=gens(reversed(range(10, 10 + B))))
    for i in range(B):
        alone = run(model, prompts[i:i + 1], cfg, generator=gens([10 + i]))
        single = run(model, prompts[i:i + 1], cfg, generator=torch.Generator().manual_seed(10 + i))
        assert torch.equal(alone, single)
        n = alone.shape[1]
        assert torch.equal(batched[i, :n], alone[0]) and bool((batched[i, n:] == PAD).all())
        m = reversed_rows.shape[1]
        assert torch.equal(reversed_rows[B - 1 - i, :min(n, m)], alone[0, :min(n, m)])
    with pytest.raises(ValueError, match="one torch.Generator per row"):
        run(model, prompts, cfg, generator=gens(range(B - 1)))


@pytest.mark.parametrize("batch,live", [(8, 8), (8, 3), (1, 1)])
def test_multinomial_draws_what_torch_multinomial_draws(batch, live):
    from blip.generation import _exponentials_match, _multinomial

    vocab = 30524
    assert _exponentials_match(batch * vocab, torch.float32)  # this build takes the vectorised path
    for seed in range(3):
        gen = torch.Generator().manual_seed(seed)
        logits = torch.randn(batch, vocab, generator=gen) * 4
        logits[:, 1::3] = -float("inf")  # zeros, as top-k / top-p leave them
        probs = logits.softmax(-1)
        rows = torch.randperm(batch, generator=gen)[:live].sort().values
        full = probs.clone()
        dead = [r for r in range(batch) if r not in rows.tolist()]
        full[dead] = 0.0
        full[dead, 0] = 1.0
        a, b = torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed)
        want = torch.multinomial(full, 1, generator=a).squeeze(1)[rows]
        got = _multinomial(probs[rows], rows, batch, b)
        assert torch.equal(got, want)
        assert torch.equal(a.get_state(), b.get_state())  # the random stream advanced alike
    for bad, message in ((torch.tensor([[0.5, float("nan")]]), "inf"), (torch.zeros(1, 2), "sum of probabilities")):
        with pytest.raises(RuntimeError, match=message):
            torch.multinomial(bad, 1)  # the same complaints as torch.multinomial
        with pytest.raises(RuntimeError, match=message):
            _multinomial(bad, torch.arange(1), 1, None)


def test_output_contract():
    model, prompts = make_model(1), make_prompts(1)
    for mode in MODES.values():
        cfg = GenerationConfig(eos_token_id=EOS, pad_token_id=0, **{**mode, "max_length": 12})
        torch.manual_seed(0)
        out = run(model, prompts, cfg)
        assert out.dtype == torch.long and out.shape[0] == B and P < out.shape[1] <= 12
        assert torch.equal(out[:, :P], prompts)
        for row in out:
            eos = (row[P:] == EOS).nonzero()
            if len(eos):  # everything after the first generated EOS is padding
                assert bool((row[P + int(eos[0]) + 1 :] == 0).all())
            else:
                assert row.numel() == 12
            if cfg.min_length:
                assert len(eos) == 0 or P + int(eos[0]) >= cfg.min_length


# ----------------------------------------------------------------------------------------------------------------
# argument validation


class _NeverCalled:
    def __call__(self, input_ids):
        raise AssertionError("decoder must not run on invalid arguments")

    def reorder(self, rows, groups):
        raise AssertionError("decoder must not run on invalid arguments")


@pytest.mark.parametrize(
    "overrides, match",
    [
        (dict(num_beams=0), "num_beams"),
        (dict(num_beams=2.0), "num_beams"),
        (dict(top_p=0.0), "top_p"),
        (dict(top_p=1.5), "top_p"),
        (dict(top_k=-1), "top_k"),
        (dict(temperature=0.0), "temperature"),
        (dict(repetition_penalty=0.0), "repetition_penalty"),
        (dict(max_length=4), "max_length"),
        (dict(max_length=3), "max_length"),
        (dict(min_length=-1), "min_length"),
        (dict(length_normalization="tokens"), "length_normalization"),
        (dict(eos_token_id=-1), "eos_token_id"),
        (dict(pad_token_id=None), "pad_token_id"),
        (dict(do_sample=True, num_beams=3), "beam sampling"),
        (dict(do_sample=1), "do_sample"),
    ],
)
def test_invalid_arguments(overrides, match):
    cfg = dataclasses.replace(GenerationConfig(), **overrides)
    with pytest.raises(ValueError, match=match):
        generate(_NeverCalled(), make_prompts(0), cfg)


def test_invalid_inputs():
    cfg = GenerationConfig()
    with pytest.raises(ValueError, match="2-D"):
        generate(_NeverCalled(), torch.ones(4, dtype=torch.long), cfg)
    with pytest.raises(ValueError, match="dtype"):
        generate(_NeverCalled(), torch.ones(2, 3), cfg)
    with pytest.raises(ValueError, match="at least one"):
        generate(_NeverCalled(), torch.ones(2, 0, dtype=torch.long), cfg)
    with pytest.raises(ValueError, match="GenerationConfig"):
        generate(_NeverCalled(), torch.ones(2, 3, dtype=torch.long), {"num_beams": 1})
    with pytest.raises(ValueError, match="generator"):
        generate(_NeverCalled(), torch.ones(2, 3, dtype=torch.long), cfg, generator=0)
    model = make_model(0)
    with pytest.raises(ValueError, match="vocab"):  # eos_token_id=102 does not exist in a 48-token vocabulary
        run(model, make_prompts(0), GenerationConfig())
    with pytest.raises(ValueError, match="half the vocab"):
        run(model, make_prompts(0), GenerationConfig(num_beams=30, eos_token_id=EOS))
