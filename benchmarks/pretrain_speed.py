"""Pretraining step speed: pairs/s and peak memory of a full ITC + ITM + LM step with AdamW.

Configs: the shape the official code was measured at on this machine (ViT 64 px / patch 8 / width
256 / depth 4 + text width 256 / depth 4, batch 32: 10.4 pairs/s), `tiny`, `small`, and `base` at
224 px batch 8 (official: 0.37 pairs/s); fp32 and bf16 autocast. Each config runs in its own
process (peak RSS = VmHWM). Official figures are the ones quoted in the issue, measured on this VM
type; the official code is not vendored here. Writes benchmarks/results/pretrain_speed.json.

    python benchmarks/pretrain_speed.py [--steps 3] [--configs official_small,tiny,small,base]
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import machine, write  # noqa: E402

CONFIGS = {  # name: (preset, overrides, batch, official pairs/s)
    "official_small": ("tiny", {"vision.image_size": 64, "vision.patch_size": 8, "vision.width": 256,
                                "vision.depth": 4, "vision.heads": 4, "text.width": 256, "text.depth": 4,
                                "text.heads": 4, "text.ffn": 1024}, 32, 10.4),
    "tiny": ("tiny", {}, 32, None),
    "small": ("small", {}, 16, None),
    "base": ("base", {"vision.image_size": 224}, 8, 0.37),
}

CHILD = r"""
import json, sys, time, torch
import blip
from blip.train.objectives import PretrainObjective, StepInfo
preset, overrides, batch, bf16, steps = sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3]), sys.argv[4] == "1", int(sys.argv[5])
torch.manual_seed(0)
model = blip.create_model(preset, task="pretrain", device="cpu", **overrides)
model.train()
objective = PretrainObjective(model, queue_size=batch * 8, queue_init="random")  # a full queue, as the official code
opt = torch.optim.AdamW([p for p in objective.parameters() if p.requires_grad], lr=1e-4, weight_decay=0.05)
s = model.config.vision.image_size
ids = torch.randint(1000, 20000, (batch, 30)); ids[:, 0] = 101; ids[:, -1] = 102
data = {"image": torch.randn(batch, 3, s, s), "input_ids": ids, "attention_mask": torch.ones_like(ids)}
def step():
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        loss = objective(data, StepInfo(steps_per_epoch=100))["loss"]
    loss.backward()
    opt.step(); opt.zero_grad(set_to_none=True)
step()
times = []
for _ in range(steps):
    t0 = time.perf_counter(); step(); times.append(time.perf_counter() - t0)
hwm = next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM")) / 1024
times.sort()
print(json.dumps({"pairs_per_s": batch / times[len(times) // 2], "step_s": times, "peak_mib": hwm}))
"""


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--configs", default=",".join(CONFIGS))
    args = ap.parse_args()
    result = {"machine": machine(), "steps": args.steps, "configs": {}}
    for name in args.configs.split(","):
        preset, overrides, batch, official = CONFIGS[name]
        row = {"batch": batch, "official_fp32_pairs_per_s": official}
        for precision in ("fp32", "bf16"):
            r = subprocess.run([sys.executable, "-c", CHILD, preset, json.dumps(overrides), str(batch),
                                "1" if precision == "bf16" else "0", str(args.steps)],
                               capture_output=True, text=True)
            if r.returncode:
                row[precision] = {"error": r.stderr.strip().splitlines()[-1]}
                continue
            row[precision] = json.loads(r.stdout.strip().splitlines()[-1])
            if official:
                row[precision]["ratio_vs_official_fp32"] = row[precision]["pairs_per_s"] / official
            print(name, precision, row[precision], file=sys.stderr)
        result["configs"][name] = row
    write("pretrain_speed", result)


if __name__ == "__main__":
    main()
