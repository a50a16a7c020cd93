"""Real crashes: `blip pretrain` SIGKILLed three times (once inside a checkpoint save, between its two
renames) and restarted with `--resume auto` ends with the parameters of an uninterrupted run, its log
holding each step once; a second run on the busy folder is refused. About 30 s: five processes start."""
import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest
import torch

from blip.train.config import TrainConfig
from blip.train.loop import Trainer

# 2 epochs of 12 steps; a checkpoint every 4 steps
ARGS = ["model=tiny", "synthetic_pairs=48", "batch_size=4", "queue_size=16", "warmup_steps=3", "init_lr=1e-3",
        "progress=false", "log_interval=1", "ckpt_interval=4", "seed=3", "device=cpu", "epochs=2"]
STEPS = 24
TIMEOUT = 90  # seconds, per process


pytestmark = pytest.mark.usefixtures("one_thread")


def start(out, pause_in_save=False):
    env = {k: v for k, v in os.environ.items() if k != "BLIP_TEST_PAUSE_SAVE"}
    env["OMP_NUM_THREADS"] = "1"  # the same arithmetic as the reference run (one thread)
    if pause_in_save:  # atomic_write sleeps after moving checkpoint.pt to checkpoint.prev.pt
        env["BLIP_TEST_PAUSE_SAVE"] = "checkpoint.pt"
    cmd = [sys.executable, "-m", "blip.cli", "pretrain", *ARGS, "--resume", "auto", "--out", str(out), "--no-progress"]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def logged_steps(out) -> list[int]:
    try:
        lines = (out / "log.jsonl").read_text().splitlines()
    except FileNotFoundError:
        return []
    steps = []
    for line in lines:
        try:
            steps.append(json.loads(line)["step"])
        except ValueError:  # a line being written
            pass
    return steps


def wait_for(proc, condition, what):
    deadline = time.monotonic() + TIMEOUT
    while not condition():
        if proc.poll() is not None:
            raise AssertionError(f"the run ended before {what}: {proc.communicate()[1][-2000:]}")
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.002)


def kill(proc):
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=TIMEOUT)
    assert proc.returncode == -signal.SIGKILL


def test_sigkills_and_resumes_end_like_an_uninterrupted_run(tmp_path):
    seed = int(time.time())
    rng = random.Random(seed)
    out = tmp_path / "run"
    ckpt, tmp, prev = out / "checkpoint.pt", out / "checkpoint.pt.tmp", out / "checkpoint.prev.pt"

    # 1. at a random step after the first checkpoint
    at = rng.randint(5, 7)
    proc = start(out)
    wait_for(proc, lambda: ckpt.exists() and max(logged_steps(out), default=0) >= at, f"step {at}")
    kill(proc)

    # 2. inside the next save, with checkpoint.pt renamed away: the worst moment
    proc = start(out, pause_in_save=True)
    wait_for(proc, lambda: tmp.exists() and not ckpt.exists(), "the paused save")
    second = subprocess.run([sys.executable, "-m", "blip.cli", "pretrain", *ARGS, "--resume", "auto",
                             "--out", str(out)], capture_output=True, text=True, timeout=TIMEOUT)
    lines = second.stderr.strip().splitlines()
    assert second.returncode == 2 and len(lines) == 1, second.stderr
    assert str(out) in lines[0] and f"pid {proc.pid}" in lines[0]
    kill(proc)
    assert prev.exists() and tmp.exists() and not ckpt.exists()

    # 3. the moment a later save starts writing (resumed from checkpoint.prev.pt)
    after = max(logged_steps(out)) + rng.randint(1, 4)
    proc = start(out)
    wait_for(proc, lambda: max(logged_steps(out), default=0) >= after and tmp.exists(), f"a save after step {after}")
    kill(proc)

    # 4. to the end
    proc = start(out)
    stdout, stderr = proc.communicate(timeout=TIMEOUT)
    assert proc.returncode == 0, stderr
    assert json.loads(stdout.splitlines()[-1])["global_step"] == STEPS
    assert logged_steps(out) == list(range(1, STEPS + 1)), f"seed {seed}"

    Trainer(TrainConfig.load(None, ARGS), tmp_path / "reference").train()
    expected = torch.load(tmp_path / "reference" / "model" / "model.pth", weights_only=True)["model"]
    got = torch.load(out / "model" / "model.pth", weights_only=True)["model"]
    assert expected.keys() == got.keys()
    different = [k for k in expected if not torch.equal(expected[k], got[k])]
    assert not different, (f"seed {seed}", different[:5])
