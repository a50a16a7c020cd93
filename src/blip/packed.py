"""Linear layers that decode through a oneDNN-packed copy of their weight on CPU.

A decoding step multiplies a few rows (one per image or beam) by every decoder weight, so its speed
is how fast the GEMM streams weights from memory. With 8 rows, F.linear (MKL) streams the decoder's
shapes at 9-13 GB/s on our 2-core test machine; with oneDNN on weights reordered once into its
blocked layout, decoding 8 `base` images ran 1.17x faster greedily, 1.20x with sampling and 1.04x with
beam 3 (same-process A/B, same tokens).

The reorder costs ~0.2 s for a `base` decoder, too much to redo for every caption batch, so each
layer keeps its packed copy (the weight's size again in memory, ~490 MB for `base` in fp32) until the
weight changes: the copy is keyed on the weight's storage (new after `.to()`) and version counter,
which every in-place update (optimizer steps, load_state_dict) bumps. Writes through `.data` bypass the version
counter; call `release(model)` after those. Packing happens only inside `decoding()` (which
`DecoderState` enters), only for inputs of at most MAX_ROWS rows that need no gradient, and never off
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
ENABLED = os.environ.get("BLIP_PACKED_DECODING", "1") != "0"
_DTYPES = (torch.float32, torch.bfloat16)
_packs: "weakref.WeakKeyDictionary[nn.Module, tuple]" = weakref.WeakKeyDictionary()
_local = threading.local()


def _available() -> bool:
    try:
        ops = torch.ops.mkldnn
        return torch.backends.mkldnn.is_available() and None not in (ops._linear_pointwise, ops._reorder_linear_weight)
    except (AttributeError, RuntimeError):
        return False


AVAILABLE = _available()


@contextlib.contextmanager
def decoding():
    """Lets `Linear` layers use (and make) packed weights in this thread for the duration."""
    before = getattr(_local, "on", False)
    _local.on = ENABLED and AVAILABLE
    try:
        yield
    finally:
        _local.on = before


def release(module: nn.Module) -> None:
    """Drops the packed copies held for `module`'s layers."""
    for m in module.modules():
        _packs.pop(m, None)


class Linear(nn.Linear):
    """nn.Linear (same parameters, same state-dict keys) that, inside `decoding()`, runs few-row CPU
    inputs without autograd through its packed weight."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        packed = self._packed(x) if getattr(_local, "on", False) else None
        if packed is None:
            return F.linear(x, self.weight, self.bias)
        return torch.ops.mkldnn._linear_pointwise(x, packed, self.bias, "none", [None], "")

    def _packed(self, x: torch.Tensor) -> torch.Tensor | None:
        w = self.weight
        if (x.device.type != "cpu" or w.device.type != "cpu" or x.dtype != w.dtype or w.dtype not in _DTYPES
                or x.numel() > MAX_ROWS * x.shape[-1]
                or (torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, w, self.bias)))):
            return None
        key = (w.data_ptr(), w._version, w.dtype, tuple(w.shape))
        hit = _packs.get(self)
        if hit is not None and (hit[0] == key or hit[0] is None):  # None: this build cannot pack
            return hit[1]
        try:
            with torch.no_grad():
                packed = torch.ops.mkldnn._reorder_linear_weight(w.detach(), MAX_ROWS // 8)
        except (AttributeError, RuntimeError):  # a oneDNN build without this layout: plain F.linear from now on
            _packs[self] = (None, None)
            return None
        _packs[self] = (key, packed)
        return packed
