"""What speed must not break: the cached, grouped, pruned decoding against a plain recompute, and bf16."""
import pytest
import torch

import blip
from blip.generation import GenerationConfig, generate
from blip.med import RawStates
from blip.vit import VisionTransformer


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


DECODING_CASES = [
    dict(num_beams=1), dict(num_beams=3), dict(num_beams=4, repetition_penalty=1.3),
    dict(num_beams=3, length_normalization="generated"), dict(do_sample=True, top_p=0.9, repetition_penalty=1.1)]


def check_cached_equals_plain(model, pixels: torch.Tensor, cfg: dict, absorb: bool) -> torch.Tensor:
    """The cached, pruned decoding of `pixels` equals the plain recompute, and some captions end early (so
    the finishing paths ran); returns the tokens."""
    with torch.inference_mode():
        states = model.visual_encoder(pixels.to(model.device))
        prompt = model.prompt_ids("a picture of ", pixels.shape[0])
        gc = GenerationConfig(max_length=14, min_length=6, **cfg)
        torch.manual_seed(1)
        fast = generate(model.text_decoder.start(states, absorb=absorb), prompt, gc)
        torch.manual_seed(1)
        plain = generate(PlainState(model.text_decoder, states), prompt, gc, prune=False)
    assert torch.equal(fast, plain)
    assert (fast == 102).any()
    return fast


@pytest.mark.parametrize("absorb", [False, True])
@pytest.mark.parametrize("cfg", DECODING_CASES)
def test_cached_generation_equals_plain_recompute(model, cfg, absorb):
    torch.manual_seed(0)
    check_cached_equals_plain(model, torch.randn(5, 3, 32, 32), cfg, absorb)


@pytest.mark.parametrize("absorb", [False, True])
def test_kv_cache_grows_and_reorders(model, absorb):
    """Longer than the initial buffer capacity, with rows duplicated and permuted on the way."""
    torch.manual_seed(2)
    with torch.inference_mode():
        states = model.visual_encoder(torch.randn(2, 3, 32, 32))
        ids = torch.randint(1000, 3000, (2, 40))
        state = model.text_decoder.start(states, absorb=absorb)
        state(ids[:, :1])
        state.reorder(torch.tensor([0, 0, 1, 1]), groups=2)
        rows = ids.repeat_interleave(2, 0)
        got = [state(rows[:, t:t + 1]) for t in range(1, 39)]
        state.reorder(torch.tensor([1, 0, 3, 2]), groups=2)
        last = state(rows[[1, 0, 3, 2], 39:40])
        full = model.text_decoder(rows, None, states.repeat_interleave(2, 0))
    assert torch.allclose(torch.stack(got, 1), full[:, 1:39], atol=1e-4)
    assert torch.allclose(last, full[[1, 0, 3, 2], 39], atol=1e-4)


@pytest.mark.parametrize("scale", [1.0, 3000.0])
def test_absorbed_cross_attention_equals_projected(model, scale):
    """Grouped rows (3 per image), several query tokens, and masked image/question positions; scale 3000
    spreads the scores so far that some probabilities are denormal floats (which absorbed() flushes)."""
    torch.manual_seed(3)
    proj = model.text_decoder.bert.layers[0].crossattention.self
    states = torch.randn(2, 7, proj.key.in_features) * scale
    mask = torch.tensor([[1, 1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1, 1]])
    x = torch.randn(6, 4, proj.query.in_features)
    with torch.inference_mode():
        k, v = proj.kv(states)
        q = proj.query(x).view(6, 4, proj.heads, -1).transpose(1, 2)
        ref = torch.nn.functional.scaled_dot_product_attention(
            q, k.repeat_interleave(3, 0), v.repeat_interleave(3, 0),
            attn_mask=mask.bool().repeat_interleave(3, 0)[:, None, None])
        ref = ref.transpose(1, 2).reshape(6, 4, -1)
        got = proj.absorbed(x, RawStates.of(states), mask.bool()[:, None, None])
        probs = (q @ k.repeat_interleave(3, 0).transpose(-1, -2) * q.shape[-1] ** -0.5).softmax(-1)
    denormal = bool(((probs > 0) & (probs < torch.finfo(probs.dtype).tiny)).any())
    assert denormal == (scale > 1)
    assert torch.allclose(got, ref, atol=1e-5 * scale)


def test_absorb_pays_for_few_decoded_rows(model):
    head_dim = model.config.text.width // model.config.text.heads
    assert model.text_decoder.absorb_pays(1, head_dim) and not model.text_decoder.absorb_pays(2, head_dim)


@pytest.mark.parametrize("dtype", ["bf16", "bf16-full"])
def test_bf16_runs_and_stays_close(hf_dirs, dtype):
    fp32 = blip.load(hf_dirs["retrieval"][0])
    bf16 = blip.load(hf_dirs["retrieval"][0], dtype=dtype)
    assert bf16.dtype == torch.bfloat16
    px = torch.randn(3, 3, 32, 32)
    a, b = fp32.embed_images(px), bf16.embed_images(px)
    assert torch.nn.functional.cosine_similarity(a, b).min() > 0.99
    out = bf16.match(px[:1], ["a dog", "a cat"])
    assert torch.allclose(out["itm"], fp32.match(px[:1], ["a dog", "a cat"])["itm"], atol=0.05)
    cap = blip.load(hf_dirs["caption"][0], dtype=dtype)
    assert len(cap.caption(px, num_beams=3, max_length=10)) == 3


def test_bf16_policy_keeps_the_text_side_fp32(hf_dirs):
    """"bf16" (and its old name "bf16-vision"): ViT in bf16, text fp32; "bf16-full": every weight."""
    fp32 = blip.load(hf_dirs["retrieval"][0])
    px = torch.randn(2, 3, 32, 32)
    for name in ("bf16", "bf16-vision"):
        mixed = blip.load(hf_dirs["retrieval"][0], dtype=name)
        assert mixed.visual_encoder.cls_token.dtype == torch.bfloat16 and mixed.text_dtype == torch.float32
        assert torch.nn.functional.cosine_similarity(fp32.embed_images(px), mixed.embed_images(px)).min() > 0.99
        assert mixed.match(px[:1], ["a dog"])["itm"].dtype == torch.float32
    full = blip.load(hf_dirs["retrieval"][0], dtype="bf16-full")
    assert {p.dtype for p in full.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in blip.load(hf_dirs["retrieval"][0], dtype=torch.bfloat16).parameters()} == {torch.bfloat16}
    cap = blip.load(hf_dirs["caption"][0], dtype="bf16")
    assert cap.text_dtype == torch.float32 and cap.generate_ids(px, num_beams=2, max_length=8)[0].shape[0] == 2
    with pytest.raises(ValueError, match="unknown dtype"):
        blip.load(hf_dirs["retrieval"][0], dtype="bf17")


def test_vit_inference_path_equals_autograd_path_and_leaves_inputs_alone(model):
    """Without autograd the ViT runs GELU and the residual adds in place and feeds SDPA contiguous
    q/k/v; with autograd it takes the plain path (and the explicit attention on CPU). Same values,
    inputs untouched, and one call's result is not overwritten by the next."""
    torch.manual_seed(4)
    px = torch.randn(2, 3, 32, 32)
    keep = px.clone()
    vit = model.visual_encoder
    with torch.inference_mode():
        fast = vit(px)
        first = fast.clone()
        vit(torch.randn(3, 3, 32, 32))  # another batch size through the same code
        again = vit(px)
    with torch.enable_grad():
        plain = vit(px.clone().requires_grad_())
    assert torch.equal(px, keep)
    assert torch.equal(fast, first) and torch.equal(again, first)
    assert torch.allclose(fast, plain.detach(), atol=1e-5)


def test_vit_inference_path_keeps_drop_path_per_image():
    """In train mode without autograd (a momentum encoder), stochastic depth still drops whole images'
    branches, drawn in the same order as the autograd path."""
    cfg = blip.get_config("tiny")
    vit = VisionTransformer(cfg.vision).train()
    for block in vit.blocks:
        block.drop_path.p = 0.5
    px = torch.randn(4, 3, cfg.vision.image_size, cfg.vision.image_size)
    torch.manual_seed(7)
    with torch.no_grad():
        fast = vit(px)
    torch.manual_seed(7)
    plain = vit(px).detach()
    assert torch.allclose(fast, plain, atol=1e-5)
    torch.manual_seed(8)
    with torch.no_grad():
        other = vit(px)
    assert not torch.allclose(fast, other, atol=1e-3)  # the draws matter


def test_bf16_on_a_cpu_without_native_bf16_warns_and_fp32_does_not():
    """Emulated bf16 (an AVX2-only CPU) made image embedding 10x slower than fp32: asking for it says so."""
    import warnings
    from blip.factory import native_bf16
    for dtype in ("bf16", "bf16-full"):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            blip.create_model("tiny", dtype=dtype, device="cpu")
        assert any("no native bf16" in str(w.message) for w in caught) == (not native_bf16("cpu"))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        blip.create_model("tiny", dtype="fp32", device="cpu")
    assert not any("bf16" in str(w.message) for w in caught)
