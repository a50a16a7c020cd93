"""Linear layers that decode through a oneDNN-packed copy of their weight on CPU.

A decoding step multiplies a few rows (one per image or beam) by every decoder weight, so its speed
is how fast the GEMM streams weights from memory. With 8 rows, F.linear (MKL) streams the decoder's
shapes at 9-13 GB/s on our 2-core test machine; with oneDNN on weights reordered once into its
blocked layout, decoding 8 `base` images ran 1.17x faster greedily, 1.20x with sampling and 1.04x with
beam 3 (same-process A/B, same tokens). Under 4 fp32 rows it is the other way round: MKL's GEMV-like
kernels stream at ~20 GB/s, and one image decodes 1.2x faster greedily (1.18x beam 3) unpacked.

The reorder costs ~0.2 s for a `base` decoder, too much to redo for every caption batch, so each
layer keeps its packed copy (the weight's size again in memory, ~490 MB for `base` in fp32) until the
weight changes: the copy is keyed on the weight's storage (new after `.to()`) and version counter,
which every in-place update (optimizer steps, load_state_dict) bumps. Writes through `.data` bypass the version
counter, and weights made under `torch.inference_mode()` have none; call `release(model)` after writing those. Packing happens only inside `decoding()` (which
`DecoderState` enters), only for inputs of MIN_ROWS[dtype] to MAX_ROWS rows that need no gradient, never off
the CPU. BLIP_PACKED_DECODING=0 turns it off (less memory, slower CPU decoding).
"""
from __future__ import annotations

import contextlib
import os
import threading
import weakref

import torch
import torch.nn.functional as F
from torch import nn

MAX_ROWS = 64
# fp32 below 4 rows: MKL's GEMV-like kernels stream 1.1-1.45x faster unpacked (single-image decoding 1.2x);
# bf16 streams faster packed at every row count.
MIN_ROWS = {torch.float32: 4, torch.bfloat16: 1}
ENABLED = os.environ.get("BLIP_PACKED_DECODING", "1") != "0"
_packs: "weakref.WeakKeyDictionary[nn.Module, tuple]" = weakref.WeakKeyDictionary()
_fused: "weakref.WeakKeyDictionary[nn.Module, tuple]" = weakref.WeakKeyDictionary()  # keyed on the first layer
_local = threading.local()


def _available() -> bool:
    try:
        ops = torch.ops.mkldnn
        return torch.backends.mkldnn.is_available() and None not in (ops._linear_pointwise, ops._reorder_linear_weight)
    except (AttributeError, RuntimeError):
        return False


AVAILABLE = _available()


@contextlib.contextmanager
def decoding(sequences: int | None = None):
    """Lets `Linear` layers use (and make) packed weights in this thread for the duration. `sequences`:
    how many rows each decoding step has (images x beams); packing needs MIN_ROWS of them, however many
    prompt tokens the first call feeds, since packing `base` for a one-image prompt alone would cost
    ~0.2 s and ~490 MB for steps that then run unpacked."""
    before = getattr(_local, "on", False), getattr(_local, "sequences", None)
    _local.on, _local.sequences = ENABLED and AVAILABLE, sequences
    try:
        yield
    finally:
        _local.on, _local.sequences = before


def release(module: nn.Module) -> None:
    """Drops the packed copies held for `module`'s layers."""
    for m in module.modules():
        _packs.pop(m, None)
        _fused.pop(m, None)


def fused(x: torch.Tensor, layers: tuple["Linear", ...]) -> torch.Tensor | None:
    """x through several layers of the same input width at once, their outputs side by side: one packed
    weight with their rows stacked (self-attention's Q, K and V: one 768x2304 matmul streams 1.15x faster
    than three 768x768 ones at 8 rows). None where `Linear` would not pack (outside `decoding()`, too few or
    too many rows, autograd, not CPU fp32/bf16) or a layer has no bias: call the layers one by one then."""
    if not getattr(_local, "on", False) or any(layer.bias is None for layer in layers):
        return None
    hit = _pack(_fused, layers, x)
    return None if hit is None else torch.ops.mkldnn._linear_pointwise(x, *hit, "none", [None], "")


def _pack(cache: weakref.WeakKeyDictionary, layers: tuple[nn.Linear, ...], x: torch.Tensor):
    """(packed weight, bias) for `layers` stacked, from `cache` (keyed on the first layer) or made now; None
    if `x` does not qualify or this build cannot pack."""
    first = layers[0].weight
    if x.device.type != "cpu" or x.dtype != first.dtype or first.dtype not in MIN_ROWS:
        return None
    rows = x.numel() // x.shape[-1]
    if not (MIN_ROWS[first.dtype] <= (getattr(_local, "sequences", None) or rows) and rows <= MAX_ROWS):
        return None
    params = [t for layer in layers for t in (layer.weight, layer.bias) if t is not None]
    if any(t.device.type != "cpu" or t.dtype != first.dtype for t in params):
        return None
    if torch.is_grad_enabled() and (x.requires_grad or any(t.requires_grad for t in params)):
        return None
    key = tuple((t.data_ptr(), _version(t), tuple(t.shape)) for t in params) + (first.dtype,)
    hit = cache.get(layers[0])
    if hit is not None and (hit[0] == key or hit[0] is None):  # None: this build cannot pack
        return hit[1]
    with torch.no_grad():
        weight = first.detach() if len(layers) == 1 else torch.cat([layer.weight.detach() for layer in layers])
        bias = layers[0].bias if len(layers) == 1 else torch.cat([layer.bias.detach() for layer in layers])
        try:
            packed = torch.ops.mkldnn._reorder_linear_weight(weight, MAX_ROWS // 8)
        except (AttributeError, RuntimeError):  # a oneDNN build without this layout: plain F.linear from now on
            cache[layers[0]] = (None, None)
            return None
    cache[layers[0]] = (key, (packed, bias))
    return packed, bias


def _version(t: torch.Tensor) -> int:
    """The tensor's version counter; weights made under torch.inference_mode() (a model loaded inside it)
    have none and reading it raises, so they key on their storage alone: write such weights in place
    only through load_state_dict or the like followed by `release(model)`."""
    return -1 if t.is_inference() else t._version


class Linear(nn.Linear):
    """nn.Linear (same parameters, same state-dict keys) that, inside `decoding()`, runs few-row CPU
    inputs without autograd through its packed weight."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hit = _pack(_packs, (self,), x) if getattr(_local, "on", False) else None
        if hit is None:
            return F.linear(x, self.weight, self.bias)
        return torch.ops.mkldnn._linear_pointwise(x, *hit, "none", [None], "")
