"""A pretraining run over shards holding a corrupt image and an empty caption: counted, skipped, finished."""
import io
import json
import tarfile

import torch
from PIL import Image

from blip.train.config import TrainConfig
from blip.train.loop import Trainer


def _add(tar, name, data: bytes):
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def test_corrupt_image_and_empty_caption_in_a_shard(tmp_path):
    torch.set_num_threads(1)
    shard = tmp_path / "shard-00000.tar"
    with tarfile.open(shard, "w") as tar:
        for i in range(10):
            key = f"{i:09d}"
            buf = io.BytesIO()
            Image.new("RGB", (40, 40), (20 * i, 100, 50)).save(buf, format="JPEG")
            image = b"\xff\xd8\xff\xe0 this is not a jpeg" if i == 3 else buf.getvalue()
            caption = "" if i == 6 else f"a picture of square number {i}"
            _add(tar, key + ".jpg", image)
            _add(tar, key + ".txt", caption.encode())
            _add(tar, key + ".json", json.dumps({"key": key}).encode())
    cfg = TrainConfig.load(None, ["model=tiny", f"shards=\"{shard}\"", "shuffle_buffer=0", "batch_size=4",
                                  "queue_size=16", "steps_per_epoch=2", "epochs=1", "randaugment=false",
                                  "progress=false", "log_interval=1", "ckpt_interval=0", "device=cpu",
                                  "image_size=64"])
    trainer = Trainer(cfg, tmp_path / "run")
    result = trainer.train()
    assert result["global_step"] == 2  # 8 good pairs -> two batches of 4: the run finished
    stats = trainer.dataset.stats()
    assert stats["skipped_images"] == 1 and stats["skipped_texts"] == 1
    logs = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert logs and all(torch.isfinite(torch.tensor(r["loss"])) for r in logs if "loss" in r)
