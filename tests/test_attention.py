"""The explicit CPU training path of blip.attention against PyTorch's SDPA, and the CPU dropout."""
import pytest
import torch
import torch.nn.functional as F

from blip.attention import EXPLICIT_MAX_KEYS, attention, dropout


def _qkv(b=3, h=2, tq=5, tk=5, d=8, grad=True):
    torch.manual_seed(0)
    return [torch.randn(b, h, t, d, requires_grad=grad) for t in (tq, tk, tk)]


@pytest.mark.parametrize("case", ["plain", "bool_mask", "float_mask", "causal"])
def test_explicit_training_path_matches_sdpa_values_and_gradients(case):
    q, k, v = _qkv()
    mask = None
    if case == "bool_mask":
        mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]], dtype=torch.bool)[:, None, None]
    elif case == "float_mask":
        mask = torch.randn(3, 1, 5, 5)
    out = attention(q, k, v, mask, causal=case == "causal")  # grad recording on CPU: explicit path
    out.square().sum().backward()
    grads = [t.grad.clone() for t in (q, k, v)]
    for t in (q, k, v):
        t.grad = None
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=case == "causal")
    ref.square().sum().backward()
    assert torch.allclose(out, ref, atol=1e-5)
    for g, t in zip(grads, (q, k, v)):
        assert torch.allclose(g, t.grad, atol=1e-5)


def test_inference_and_long_keys_take_sdpa_and_agree():
    q, k, v = _qkv(tk=EXPLICIT_MAX_KEYS + 1, grad=False)
    assert torch.allclose(attention(q, k, v), F.scaled_dot_product_attention(q, k, v), atol=1e-5)


def test_attention_dropout_zeroes_probabilities_at_rate_p():
    q, k, v = _qkv(b=1, h=1, tq=400, tk=200, d=4, grad=False)
    v = torch.eye(200)[None, None]  # the output rows are the (dropped, rescaled) probabilities
    torch.manual_seed(1)
    probs = attention(q, k, v, dropout_p=0.25)
    assert abs((probs == 0).float().mean().item() - 0.25) < 0.01
    full = torch.softmax(q @ k.transpose(-1, -2) / 2, -1)
    kept = probs != 0
    assert torch.allclose(probs[kept], full[kept] / 0.75, rtol=1e-4)


@pytest.mark.parametrize("shape", [(7,), (3, 5, 9)])  # odd sizes: the mask is cut from pairs of 16-bit halves
def test_dropout_rate_scale_and_seed(shape):
    torch.manual_seed(0)
    x = torch.ones(*shape).expand(4000, *shape)
    y = dropout(x, 0.3)
    assert y.shape == x.shape
    assert abs((y == 0).float().mean().item() - 0.3) < 0.01
    assert torch.allclose(y[y != 0], torch.full_like(y[y != 0], 1 / 0.7), rtol=1e-4)
    torch.manual_seed(0)
    assert torch.equal(dropout(x, 0.3), y)
    assert torch.equal(dropout(x, 1.0), torch.zeros_like(x))
