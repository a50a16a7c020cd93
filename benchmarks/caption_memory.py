"""Peak memory of captioning: ours against transformers, each side in its own fresh process on the
same random `base` weights (8 images, 384 px, beam 3). Reports peak RSS (VmHWM, MiB) after loading and
after captioning. Writes benchmarks/results/caption_memory.json."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import hf_base_caption, machine, write  # noqa: E402

CHILD = r"""
import json, sys, torch
side, folder = sys.argv[1], sys.argv[2]
def peak():  # VmHWM: this process's own high-water mark (ru_maxrss would inherit the parent's)
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
px = torch.randn(8, 3, 384, 384)
if side == "ours":
    import blip
    model = blip.load(folder, device="cpu")
    loaded = peak()
    model.generate_ids(px, num_beams=3, max_length=20, min_length=5)
else:
    from transformers import BlipForConditionalGeneration
    model = BlipForConditionalGeneration.from_pretrained(folder).eval()
    loaded = peak()
    ids = torch.tensor([[30522, 1037, 3861, 1997, 102]] * 8)
    with torch.inference_mode():
        model.generate(pixel_values=px, input_ids=ids, num_beams=3, max_length=20, min_length=5)
print(json.dumps({"after_load_mib": loaded, "peak_mib": peak()}))
"""


def main() -> None:
    _, folder = hf_base_caption()
    out = {"machine": machine()}
    for side in ("transformers", "ours"):
        r = subprocess.run([sys.executable, "-c", CHILD, side, str(folder)], capture_output=True, text=True, check=True)
        out[side] = json.loads(r.stdout.strip().splitlines()[-1])
    out["peak_ratio_ours_over_transformers"] = out["ours"]["peak_mib"] / out["transformers"]["peak_mib"]
    out["captioning_increment_ratio"] = ((out["ours"]["peak_mib"] - out["ours"]["after_load_mib"]) /
                                         max(out["transformers"]["peak_mib"] - out["transformers"]["after_load_mib"], 1))
    write("caption_memory", out)


if __name__ == "__main__":
    main()
