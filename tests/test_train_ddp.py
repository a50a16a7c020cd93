"""Two CPU processes under torchrun (gloo): DDP keeps the ranks' parameters identical, and the feature
queue receives the momentum features of both ranks."""
import os
import socket
import subprocess
import sys
import textwrap

import torch

DRIVER = textwrap.dedent('''
    import sys
    import torch
    from blip.train import distributed as dist
    from blip.train.config import TrainConfig
    from blip.train.loop import Trainer

    out = sys.argv[1]
    cfg = TrainConfig.load(None, ["model=tiny", "synthetic_pairs=16", "batch_size=2", "queue_size=8", "epochs=1",
                                  "max_steps=3", "warmup_steps=2", "init_lr=1e-3", "progress=false", "log_interval=1",
                                  "ckpt_interval=0", "negatives_all_rank=true", "device=cpu"])
    trainer = Trainer(cfg, out)
    start = {k: v.detach().clone() for k, v in trainer.model.named_parameters()}
    momentum = trainer.objective.momentum
    enqueued = []
    original = momentum.enqueue
    def recording(image_feat, text_feat):
        enqueued.append((image_feat.clone(), text_feat.clone()))
        original(image_feat, text_feat)
    momentum.enqueue = recording
    trainer.train()
    torch.save({"world": dist.world_size(), "start": start,
                "params": {k: v.detach().clone() for k, v in trainer.model.named_parameters()},
                "image_queue": momentum.image_queue.clone(), "text_queue": momentum.text_queue.clone(),
                "ptr": int(momentum.queue_ptr), "enqueued": enqueued}, f"{out}/rank{dist.rank()}.pt")
    dist.cleanup()
''')


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_ranks_stay_in_sync_and_share_the_queue(tmp_path):
    script = tmp_path / "driver.py"
    script.write_text(DRIVER)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--nnodes=1",
           f"--master_port={free_port()}", str(script), str(tmp_path)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert r0["world"] == r1["world"] == 2
    # the ranks saw different data, yet DDP kept every parameter identical, and training moved them
    assert r0["params"].keys() == r1["params"].keys()
    assert all(torch.equal(r0["params"][k], r1["params"][k]) for k in r0["params"])
    assert not torch.equal(r0["params"]["visual_encoder.cls_token"], r0["start"]["visual_encoder.cls_token"])
    # 3 steps x global batch 4 into a queue of 8: the pointer wrapped to 4, and the last step's
    # columns hold rank 0's then rank 1's momentum features
    assert r0["ptr"] == r1["ptr"] == 4
    assert torch.equal(r0["image_queue"], r1["image_queue"]) and torch.equal(r0["text_queue"], r1["text_queue"])
    img0, txt0 = r0["enqueued"][-1]
    img1, txt1 = r1["enqueued"][-1]
    assert not torch.allclose(img0, img1)
    assert torch.equal(r0["image_queue"][:, 0:4], torch.cat([img0, img1]).T)
    assert torch.equal(r0["text_queue"][:, 0:4], torch.cat([txt0, txt1]).T)
    prev0, prev1 = r0["enqueued"][-2][0], r1["enqueued"][-2][0]
    assert torch.equal(r0["image_queue"][:, 4:8], torch.cat([prev0, prev1]).T)
    assert (tmp_path / "log.jsonl").exists() and (tmp_path / "checkpoint.pt").exists()
