"""Shared benchmark plumbing: same random weights for both sides, interleaved repeats, medians."""
from __future__ import annotations

import atexit
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).parent / "results"


def scratch_dir(prefix: str = "blip-bench-") -> Path:
    """A temporary folder removed when the process exits (a saved `base` model is ~0.9 GB; leaving one per
    run behind filled this machine's disk)."""
    folder = Path(tempfile.mkdtemp(prefix=prefix))
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    return folder


def hf_base(kind: str = "BlipForConditionalGeneration", image_size: int = 384, seed: int = 0, device: str = "cpu",
            vision: dict | None = None, text: dict | None = None):
    """A transformers BLIP model (`kind`: BlipForConditionalGeneration, BlipForImageTextRetrieval, ...) with
    `base` shapes (or those of the `vision` / `text` config overrides) and random weights, saved to a folder
    our loader reads, so both sides run the very same weights; the model is returned on `device`, in eval mode."""
    import transformers
    torch.manual_seed(seed)
    vision = dict(dict(image_size=image_size, layer_norm_eps=1e-6, initializer_range=0.02), **(vision or {}))
    text = dict(dict(num_attention_heads=12, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                     encoder_hidden_size=vision.get("hidden_size", 768)), **(text or {}))
    cfg = transformers.BlipConfig(text_config=text, vision_config=vision)
    model = getattr(transformers, kind)(cfg).eval()
    folder = scratch_dir()
    model.save_pretrained(str(folder))
    return model.to(device), folder


def hf_base_caption(image_size: int = 384, seed: int = 0, device: str = "cpu"):
    return hf_base("BlipForConditionalGeneration", image_size, seed, device)


def sync() -> None:
    """Wait for queued GPU work, so wall-clock times on CUDA measure the work and not its launch."""
    if torch.cuda.is_initialized():
        torch.cuda.synchronize()


def timed(fn, *args, **kwargs):
    sync()
    t0 = time.perf_counter()
    out = fn(*args, **kwargs)
    sync()
    return time.perf_counter() - t0, out


def interleave(sides: dict, repeats: int, deadline: float | None = None,
               min_repeats: int = 2) -> dict[str, list[float]]:
    """Run each side in turn, `repeats` rounds, the order reversed every other round (so a machine that
    speeds up or slows down during the run favours neither side); returns seconds per side.
    With a `deadline` (a time.perf_counter() value), stop after `min_repeats` rounds once another
    round would end past it: on a slow hour a benchmark keeps to its time limit with fewer rounds."""
    times = {name: [] for name in sides}
    for i in range(repeats):
        start = time.perf_counter()
        for name, fn in (reversed(sides.items()) if i % 2 else sides.items()):
            times[name].append(timed(fn)[0])
        now = time.perf_counter()
        if deadline is not None and i + 1 >= min_repeats and now + (now - start) > deadline:
            break
    return times


def median(xs):
    return statistics.median(xs)


def round_ratios(slow: list[float], fast: list[float]) -> list[float]:
    """slow/fast for each round (rounded, for the results files)."""
    return [round(s / f, 3) for s, f in zip(slow, fast)]


def paired_ratio(slow: list[float], fast: list[float]) -> float:
    """Median over rounds of slow/fast: each round's two sides ran back to back, so their ratio is robust
    to this VM's speed drifting by up to 1.5x within minutes, which a ratio of medians is not."""
    return median([s / f for s, f in zip(slow, fast)])


def machine(device: str = "cpu") -> dict:
    """Where a result was measured; `cuda` names the card only when the benchmark ran on it."""
    on_gpu = torch.device(device).type == "cuda"
    return {"device": device, "python": sys.version.split()[0], "torch": torch.__version__,
            "threads": torch.get_num_threads(), "cpu": platform.processor() or platform.machine(),
            "cores": os.cpu_count(),
            "cuda": torch.cuda.get_device_name(torch.device(device)) if on_gpu else None}


def write(name: str, result: dict) -> Path:
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return path
