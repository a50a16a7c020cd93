"""blip.packed: decoding through oneDNN-packed weights must give F.linear's values, follow weight
updates, keep autograd, and leave every other call on the plain path."""
import copy

import pytest
import torch
import torch.nn.functional as F

import blip
from blip import packed
from blip.generation import GenerationConfig, generate

pytestmark = pytest.mark.skipif(not packed.AVAILABLE, reason="this torch build has no oneDNN packed linear")


@pytest.fixture
def layer():
    torch.manual_seed(0)
    return packed.Linear(48, 40)


def test_few_rows_match_f_linear_and_the_pack_is_reused(layer):
    x = torch.randn(3, 2, 48)
    with torch.no_grad(), packed.decoding():
        y = layer(x)
        first = packed._packs[layer][1]
        layer(x)
        assert packed._packs[layer][1] is first
    assert torch.allclose(y, F.linear(x, layer.weight, layer.bias), atol=1e-5)


def test_the_pack_follows_in_place_weight_updates(layer):
    x = torch.randn(4, 48)
    with torch.no_grad(), packed.decoding():
        layer(x)
        layer.weight.mul_(-2.0)  # what an optimizer step or load_state_dict does
        y = layer(x)
    assert torch.allclose(y, F.linear(x, layer.weight, layer.bias), atol=1e-5)
    layer.load_state_dict({"weight": torch.randn(40, 48), "bias": torch.randn(40)})
    with torch.no_grad(), packed.decoding():
        assert torch.allclose(layer(x), F.linear(x, layer.weight, layer.bias), atol=1e-5)
    packed.release(layer)
    assert layer not in packed._packs


def test_plain_path_outside_decoding_for_many_rows_and_with_autograd(layer):
    few, many = torch.randn(packed.MIN_ROWS[torch.float32], 48), torch.randn(packed.MAX_ROWS + 1, 48)
    one = torch.randn(packed.MIN_ROWS[torch.float32] - 1, 48)  # GEMV-like shapes: MKL streams them faster unpacked
    with torch.no_grad():
        assert torch.equal(layer(few), F.linear(few, layer.weight, layer.bias))  # not decoding
        with packed.decoding():
            assert torch.equal(layer(many), F.linear(many, layer.weight, layer.bias))
            assert torch.equal(layer(one), F.linear(one, layer.weight, layer.bias))
    assert layer not in packed._packs
    with packed.decoding():
        y = layer(few)  # the weight needs a gradient: F.linear
    y.sum().backward()
    assert layer.weight.grad is not None and torch.allclose(layer.weight.grad, few.sum(0).expand(40, -1))
    layer.weight.requires_grad_(False)  # a frozen weight with a trainable bias still needs autograd
    layer.bias.grad = None
    with packed.decoding():
        layer(few).sum().backward()
    assert torch.equal(layer.bias.grad, torch.full((40,), float(packed.MIN_ROWS[torch.float32])))


def test_bf16_and_deepcopy(layer):
    x = torch.randn(4, 48)
    with torch.no_grad(), packed.decoding():
        layer(x)
        twin = copy.deepcopy(layer)  # momentum encoders are deep copies; packs live outside the module
        assert torch.allclose(twin(x), layer(x), atol=1e-5)
        half = layer.to(torch.bfloat16)
        y = half(x.bfloat16())
    assert y.dtype == torch.bfloat16
    assert torch.allclose(y.float(), F.linear(x, layer.weight.float(), layer.bias.float()), atol=0.1)


def test_fused_layers_match_each_layer_and_follow_updates():
    torch.manual_seed(0)
    layers = (packed.Linear(48, 40), packed.Linear(48, 24), packed.Linear(48, 40))
    x = torch.randn(5, 1, 48)
    want = lambda: torch.cat([F.linear(x, m.weight, m.bias) for m in layers], -1)  # noqa: E731
    with torch.no_grad():
        assert packed.fused(x, layers) is None  # not decoding: the caller runs the layers one by one
        with packed.decoding():
            assert torch.allclose(packed.fused(x, layers), want(), atol=1e-5)
            layers[1].bias.add_(1.0)  # a bias update alone must refresh the stacked copy
            assert torch.allclose(packed.fused(x, layers), want(), atol=1e-5)
            assert packed.fused(torch.randn(packed.MAX_ROWS + 1, 48), layers) is None
    packed.release(layers[0])
    assert layers[0] not in packed._fused
    with packed.decoding():
        assert packed.fused(x, layers) is None  # the weights need gradients


@pytest.mark.parametrize("cfg", [dict(num_beams=1), dict(num_beams=3), dict(do_sample=True, top_p=0.9)])
def test_generation_is_the_same_with_and_without_packing(hf_dirs, cfg, monkeypatch):
    model = blip.load(hf_dirs["caption"][0])
    states = model.visual_encoder(torch.randn(4, 3, 32, 32)).detach()
    prompt = model.prompt_ids("a picture of ", 4)
    gen = GenerationConfig(max_length=12, min_length=3, **cfg)
    outs = []
    for on in (False, True):
        monkeypatch.setattr(packed, "ENABLED", on)
        torch.manual_seed(0)
        with torch.inference_mode():
            outs.append(generate(model.text_decoder.start(states, absorb=True), prompt, gen))
    assert torch.equal(outs[0], outs[1])
    assert any(m in packed._packs for m in model.text_decoder.modules())  # packing did happen
    assert any(m in packed._fused for m in model.text_decoder.modules())  # and self-attention ran fused


def test_a_few_sequences_never_pack_even_with_a_long_prompt(hf_dirs):
    """One image, beam 3: every step has 3 rows (fp32 decodes them unpacked), so its prompt of 4+ tokens
    must not pack the whole decoder for that one call; 2 images x beam 3 (6 rows a step) do pack."""
    model = blip.load(hf_dirs["caption"][0])
    packed.release(model)
    px = torch.randn(2, 3, 32, 32)
    one = model.caption(px[:1], num_beams=3, max_length=10, prompt="a picture of a very long prompt ")
    assert not any(m in packed._packs or m in packed._fused for m in model.text_decoder.modules())
    with packed.decoding(sequences=2):  # the prompt call's tokens do not count, its sequences do
        with torch.no_grad():
            layer = model.text_decoder.cls.predictions.decoder
            layer(torch.randn(2, 8, layer.in_features))
    assert layer not in packed._packs
    two = model.caption(px, num_beams=3, max_length=10, prompt="a picture of a very long prompt ")
    assert any(m in packed._packs for m in model.text_decoder.modules())
    assert two[0] == one[0]  # packed or not, the same caption
