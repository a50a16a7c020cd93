"""Build a model: from a preset (random weights) or from any checkpoint (`blip.load`)."""
from __future__ import annotations

import warnings

import torch

from .checkpoint import CheckpointError, load_into, read_checkpoint
from .config import PRESETS, BlipConfig, get_config
from .model import Blip
from .nlvr import BlipNLVR, twin_state_dict
from .pretrained import resolve

DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16-full": torch.bfloat16, "bfloat16": torch.bfloat16,
          "fp16": torch.float16, "float16": torch.float16}
# "bf16" is a policy, not one dtype: the image encoder (most of the compute, and 5x faster in bf16 on
# AMX CPUs) in bf16, the text side in fp32. Decoding is argmax-sensitive: in bf16 it changed 21-36% of
# the captions of trained synthetic models; with the text side in fp32, 99.5-100% are token-identical
# to fp32 (benchmarks/bf16_quality.py), at 3.6-5.7x transformers' fp32 speed against 5.0-9.1x for all-bf16.
MIXED = {"bf16", "bf16-vision"}
DTYPE_NAMES = ["fp32", "bf16", "bf16-full", "fp16"]


def parse_dtype(dtype) -> torch.dtype | None:
    """The one dtype of a whole-model precision; None for the mixed "bf16" policy (and for None)."""
    if dtype in MIXED:
        return None
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; expected one of {', '.join(DTYPE_NAMES)}")
    return DTYPES[dtype]


def native_bf16(device) -> bool:
    """Whether `device` computes bf16 in hardware: CUDA when it says so; a CPU when oneDNN has native bf16
    kernels (AVX-512 BF16, AMX). On an AVX2-only CPU bf16 is emulated and a training step runs several times
    slower than in fp32 (docs/pretraining_synthetic.md), so bf16 autocast there is a cost, not a saving."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if device.type != "cpu":
        return True  # other accelerators: trust the request
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def default_device(device=None) -> torch.device:
    """`device` as a torch.device, CUDA when present for None. A device this machine lacks (or a misspelt
    one) is a ValueError naming it here, not an AssertionError from deep inside `.to()`."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"unknown device {device!r}; expected cpu, cuda, cuda:N or mps") from None
    if dev.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            build = "a CPU-only PyTorch build" if torch.version.cuda is None else "no CUDA device visible"
            raise ValueError(f"device {device!r} asked for, but this machine has none ({build})")
        if dev.index is not None and dev.index >= count:
            raise ValueError(f"device {device!r} asked for, but only {count} CUDA device(s) are visible")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"device {device!r} asked for, but MPS is not available here")
    return dev


def _place(model: Blip, device: torch.device, dtype) -> Blip:
    """The model on `device` (already checked by `default_device`) in `dtype`, in eval mode."""
    if (dtype in MIXED or parse_dtype(dtype) == torch.bfloat16) and not native_bf16(device):
        warnings.warn(f"dtype {dtype}: this {device.type} has no native bf16, so bf16 is emulated and several "
                      f"times slower than fp32 here; dtype='fp32' is faster", stacklevel=3)
    model = model.to(device)
    if dtype in MIXED:
        model.visual_encoder.to(torch.bfloat16)
        return model.eval()
    dtype = parse_dtype(dtype)
    if dtype is not None:
        model = model.to(dtype)
    return model.eval()


def build(config: BlipConfig) -> Blip | BlipNLVR:
    """The model class of `config.task`: NLVR2's two-image model has its own."""
    return BlipNLVR(config) if config.task == "nlvr" else Blip(config)


def create_model(config: BlipConfig | str = "base", task: str | None = None, device=None, dtype=None,
                 **overrides) -> Blip:
    """A randomly initialised model from a preset name or a config, e.g. create_model("tiny", "caption")."""
    device = default_device(device)  # fails before building a model it could not place
    if isinstance(config, str):
        config = get_config(config)
    if task:
        overrides["task"] = task
    if overrides:
        config = config.replace(**overrides)
    return _place(build(config), device, dtype)


def load(name_or_path, task: str | None = None, config: BlipConfig | str | dict | None = None,
         device=None, dtype=None, strict: bool = True) -> Blip:
    """Load weights: an official `.pth` (path, URL or name such as "model_base_caption_capfilt_large"),
    a transformers BLIP folder or hub id, or a folder in our format (`blip convert --to blip`).

    task picks the model to build when it differs from the checkpoint's (e.g. "caption" from a
    pretrained checkpoint); config replaces the inferred architecture (a BlipConfig, a JSON path, or
    a dict of dotted overrides such as {"vision.image_size": 480}). dtype: "fp32"; "bf16" (the image encoder in
    bf16, the text side fp32: captions match fp32); "bf16-full" or torch.bfloat16 (every weight in bf16:
    fastest, least memory, near-tie tokens may differ); "fp16".
    """
    device = default_device(device)  # a missing device or an unknown dtype fails before the weights are read
    parse_dtype(dtype)
    if isinstance(name_or_path, str) and name_or_path in PRESETS:
        raise CheckpointError(f"{name_or_path!r} is a preset, not a checkpoint: "
                              f"use blip.create_model({name_or_path!r}) for random weights")
    path, implied_task = resolve(name_or_path)
    inferred, sd = read_checkpoint(path, task=task or implied_task)
    if isinstance(config, dict):
        cfg = inferred.replace(**config)
    elif isinstance(config, str):
        cfg = BlipConfig.from_json(config)
    else:
        cfg = config or inferred
    if task and cfg.task != task:
        cfg = cfg.replace(task=task)
    if cfg.task == "nlvr":  # from a one-image checkpoint: its cross-attention copied to both branches
        sd = twin_state_dict(sd)
    with torch.device("meta"):  # no random initialisation of weights about to be overwritten
        model = build(cfg)
    report = load_into(model, sd, strict=strict)
    if any(t.is_meta for t in model.state_dict().values()):  # some tensors kept their initial value
        model = build(cfg)
        report = load_into(model, sd, strict=strict)
    model.load_report = report
    model.source = str(name_or_path)  # what it was loaded from: an image index records it (blip.index)
    return _place(model, device, dtype)
