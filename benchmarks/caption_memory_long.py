"""Memory of a long `blip caption` run: does resident memory grow with the number of images?

Writes 2,000 small images (128 px, PNG and JPEG) to a temporary folder, saves a preset model (`tiny` by
default: random weights, loaded like any checkpoint), runs `blip caption FOLDER --batch-size 16` in a
subprocess, and samples its VmRSS every 0.5 s against the number of captions printed so far. Reports RSS
at 10%, 50% and 90% of the images and at the end, the peak (VmHWM), and the slope over the second half of
the images (least squares, MiB per 1,000 images; ~0 when memory does not grow).
Writes benchmarks/results/caption_memory_long.json."""
from __future__ import annotations

import argparse
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from common import machine, scratch_dir, write  # noqa: E402


def make_images(folder: Path, n: int, size: int) -> None:
    """Gradients with a random box: varied pixels that compress like photos, not like noise."""
    from PIL import Image
    rng = np.random.default_rng(0)
    ramp = np.linspace(0, 255, size, dtype=np.float32)
    for i in range(n):
        a = np.empty((size, size, 3), np.float32)
        a[..., 0], a[..., 1], a[..., 2] = ramp[None, :], ramp[:, None], rng.uniform(0, 255)
        x, y, w = rng.integers(0, size // 2, 3)
        a[y:y + w + 8, x:x + w + 8] = rng.uniform(0, 255, 3)
        Image.fromarray(a.astype(np.uint8)).save(folder / f"{i:05d}.{'png' if i % 2 else 'jpg'}")


def status(pid: int) -> dict[str, float]:
    """VmRSS and VmHWM of `pid` in MiB ({} once it has exited)."""
    try:
        lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    except OSError:
        return {}
    return {k: int(v.split()[0]) / 1024 for k, v in (line.split(":", 1) for line in lines) if k in ("VmRSS", "VmHWM")}


def slope_per_1000(points: list[tuple[int, float]]) -> float:
    x, y = np.array([p[0] for p in points], float), np.array([p[1] for p in points], float)
    return float(np.polyfit(x, y, 1)[0] * 1000) if len(points) > 2 and np.ptp(x) > 0 else float("nan")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=2000)
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--preset", default="tiny", help="tiny or small (random weights, saved in our format)")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--interval", type=float, default=0.5)
    ap.add_argument("--name", default="caption_memory_long")
    args = ap.parse_args()

    import torch

    import blip
    from blip.checkpoint import save_blip
    root = scratch_dir()
    (root / "images").mkdir()
    make_images(root / "images", args.images, args.size)
    torch.manual_seed(0)
    save_blip(blip.create_model(args.preset, task="caption", device="cpu"), root / "model")

    cmd = [sys.executable, "-m", "blip.cli", "caption", str(root / "images"), "--model", str(root / "model"),
           "--batch-size", str(args.batch_size), "--quiet"]
    t0 = time.perf_counter()
    errors = open(root / "stderr.txt", "w+")  # a file: a full stderr pipe would stall the run
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=errors, text=True)
    done = [0]

    def count_captions():
        for _ in proc.stdout:
            done[0] += 1

    reader = threading.Thread(target=count_captions, daemon=True)
    reader.start()
    samples = []  # (seconds, captions printed, VmRSS MiB)
    peak = 0.0
    while proc.poll() is None:
        s = status(proc.pid)
        if s:
            samples.append((round(time.perf_counter() - t0, 2), done[0], s["VmRSS"]))
            peak = max(peak, s["VmHWM"])
        time.sleep(args.interval)
    reader.join()
    seconds = time.perf_counter() - t0
    if proc.returncode != 0 or done[0] != args.images:
        errors.seek(0)
        sys.exit(f"blip caption failed (exit {proc.returncode}, {done[0]} captions): {errors.read()[-2000:]}")

    def rss_at(fraction: float) -> float:
        return next((rss for _, n, rss in samples if n >= fraction * args.images), samples[-1][2])

    second_half = [(n, rss) for _, n, rss in samples if n >= args.images / 2]
    write(args.name, {
        "machine": machine(),
        "command": f"blip caption IMAGES --model {args.preset} --batch-size {args.batch_size} --quiet",
        "images": args.images, "image_size": args.size, "preset": args.preset, "batch_size": args.batch_size,
        "seconds": round(seconds, 1), "images_per_s": round(args.images / seconds, 2), "samples": len(samples),
        "rss_mib": {"10%": rss_at(0.1), "50%": rss_at(0.5), "90%": rss_at(0.9), "end": samples[-1][2]},
        "peak_mib": peak,
        "slope_mib_per_1000_images_second_half": round(slope_per_1000(second_half), 2),
        "series_seconds_images_rss_mib": samples[::max(1, len(samples) // 60)],
    })


if __name__ == "__main__":
    main()
