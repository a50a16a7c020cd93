"""Loading a `base` checkpoint in our format (memory-mapped safetensors). Target: under 2 s.
Timed in this process (warm: torch's lazy imports done) and in fresh processes (cold: what a
`blip caption` run pays after importing torch), three times each, medians.
Writes benchmarks/results/load_speed.json."""
from __future__ import annotations

import subprocess
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
    code = ("import time, blip\n"
            "t0 = time.perf_counter()\n"
            f"blip.load({str(folder)!r}, device='cpu')\n"
            "print(time.perf_counter() - t0)\n")
    cold = [float(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout)
            for _ in range(3)]
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        blip.load(folder, device="cpu")
        times.append(time.perf_counter() - t0)
    write("load_speed", {"machine": machine(), "task": "caption", "seconds": times, "median_s": median(times),
                         "fresh_process_seconds": cold, "fresh_process_median_s": median(cold)})


if __name__ == "__main__":
    main()
