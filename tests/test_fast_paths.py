"""What speed must not break: the cached, grouped, pruned decoding against a plain recompute, and bf16."""
import pytest
import torch

import blip
from blip.generation import GenerationConfig, generate


class PlainState:
    """No cache, no sharing: every step re-runs the whole decoder on the whole sequence, with the
    image states copied for every row."""

    def __init__(self, decoder, states):
        self.decoder, self.states, self.ids = decoder, states, None

    def __call__(self, input_ids):
        self.ids = input_ids if self.ids is None else torch.cat([self.ids, input_ids], 1)
        return self.decoder(self.ids, None, self.states)[:, -1].float()

    def reorder(self, rows, groups):
        self.ids, self.states = self.ids[rows], self.states[rows]


@pytest.fixture(scope="module")
def model(hf_dirs):
    return blip.load(hf_dirs["caption"][0])


@pytest.mark.parametrize("cfg", [
    dict(num_beams=1), dict(num_beams=3), dict(num_beams=4, repetition_penalty=1.3),
    dict(num_beams=3, length_normalization="generated"), dict(do_sample=True, top_p=0.9, repetition_penalty=1.1)])
def test_cached_generation_equals_plain_recompute(model, cfg):
    torch.manual_seed(0)
    with torch.inference_mode():
        states = model.visual_encoder(torch.randn(5, 3, 32, 32))
        prompt = model.prompt_ids("a picture of ", 5)
        gc = GenerationConfig(max_length=14, min_length=6, **cfg)
        torch.manual_seed(1)
        fast = generate(model.text_decoder.start(states), prompt, gc)
        torch.manual_seed(1)
        plain = generate(PlainState(model.text_decoder, states), prompt, gc, prune=False)
    assert torch.equal(fast, plain)
    assert (fast == 102).any()  # some captions end before max_length: the finishing paths ran


def test_kv_cache_grows_and_reorders(model):
    """Longer than the initial buffer capacity, with rows duplicated and permuted on the way."""
    torch.manual_seed(2)
    with torch.inference_mode():
        states = model.visual_encoder(torch.randn(2, 3, 32, 32))
        ids = torch.randint(1000, 3000, (2, 40))
        state = model.text_decoder.start(states)
        state(ids[:, :1])
        state.reorder(torch.tensor([0, 0, 1, 1]), groups=2)
        rows = ids.repeat_interleave(2, 0)
        got = [state(rows[:, t:t + 1]) for t in range(1, 39)]
        state.reorder(torch.tensor([1, 0, 3, 2]), groups=2)
        last = state(rows[[1, 0, 3, 2], 39:40])
        full = model.text_decoder(rows, None, states.repeat_interleave(2, 0))
    assert torch.allclose(torch.stack(got, 1), full[:, 1:39], atol=1e-4)
    assert torch.allclose(last, full[[1, 0, 3, 2], 39], atol=1e-4)


def test_bf16_runs_and_stays_close(hf_dirs):
    fp32 = blip.load(hf_dirs["retrieval"][0])
    bf16 = blip.load(hf_dirs["retrieval"][0], dtype="bf16")
    assert bf16.dtype == torch.bfloat16
    px = torch.randn(3, 3, 32, 32)
    a, b = fp32.embed_images(px), bf16.embed_images(px)
    assert torch.nn.functional.cosine_similarity(a, b).min() > 0.99
    out = bf16.match(px[:1], ["a dog", "a cat"])
    assert torch.allclose(out["itm"], fp32.match(px[:1], ["a dog", "a cat"])["itm"], atol=0.05)
    cap = blip.load(hf_dirs["caption"][0], dtype="bf16")
    assert len(cap.caption(px, num_beams=3, max_length=10)) == 3


def test_bf16_vision_keeps_the_text_side_fp32(hf_dirs):
    fp32 = blip.load(hf_dirs["retrieval"][0])
    mixed = blip.load(hf_dirs["retrieval"][0], dtype="bf16-vision")
    assert mixed.visual_encoder.cls_token.dtype == torch.bfloat16 and mixed.text_dtype == torch.float32
    px = torch.randn(2, 3, 32, 32)
    assert torch.nn.functional.cosine_similarity(fp32.embed_images(px), mixed.embed_images(px)).min() > 0.99
    assert mixed.match(px[:1], ["a dog"])["itm"].dtype == torch.float32
    cap = blip.load(hf_dirs["caption"][0], dtype="bf16-vision")
    assert len(cap.caption(px, num_beams=2, max_length=8)) == 2
