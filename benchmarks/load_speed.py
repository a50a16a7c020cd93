"""Loading a `base` checkpoint in our format (memory-mapped safetensors). Target: under 2 s.
Writes benchmarks/results/load_speed.json."""
from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import machine, median, scratch_dir, write  # noqa: E402

import blip  # noqa: E402
from blip.checkpoint import save_blip  # noqa: E402


def main() -> None:
    folder = scratch_dir() / "base"
    save_blip(blip.create_model("base", task="caption", device="cpu"), folder)
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        blip.load(folder, device="cpu")
        times.append(time.perf_counter() - t0)
    write("load_speed", {"machine": machine(), "task": "caption", "seconds": times, "median_s": median(times)})


if __name__ == "__main__":
    main()
