"""Training reliability, in one process: damaged checkpoints on resume, `--resume auto`, a full disk,
the folder lock, and the log trimmed back to the checkpoint. Real SIGKILLs: test_crash.py."""
import errno
import json
import os
import re
import shutil

import pytest
import torch

from blip.checkpoint import CheckpointError
from blip.cli import main
from blip.train.config import TrainConfig
from blip.train.loop import FolderBusy, Trainer, lock_folder, read_checkpoint, trim_log

# 3 steps; checkpoints after step 2 (interval) and 3 (epoch end): checkpoint.prev.pt and checkpoint.pt
TINY = ["model=tiny", "synthetic_pairs=12", "batch_size=4", "queue_size=16", "warmup_steps=3", "init_lr=1e-3",
        "progress=false", "log_interval=1", "ckpt_interval=2", "seed=3", "device=cpu"]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("trained")
    Trainer(TrainConfig.load(None, TINY), out).train()
    return out


@pytest.fixture
def run(trained, tmp_path):
    """A copy of the trained run's folder."""
    return shutil.copytree(trained, tmp_path / "run")


def step_of(path):
    return read_checkpoint(path)["progress"]["global_step"]


def one_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def test_the_last_two_checkpoints_are_kept(run):
    assert step_of(run / "checkpoint.pt") == 3 and step_of(run / "checkpoint.prev.pt") == 2
    assert not list(run.glob("*.tmp"))


# "pickle-like": random bytes that begin like a pickle of an unknown protocol (as 1 in 256 random files
# do), on which torch warns before failing; the warning must not reach the user.
@pytest.mark.parametrize("damage", ["truncated", "random bytes", "pickle-like"])
@pytest.mark.parametrize("with_config", [False, True])  # the config is read by cli.py, else by the Trainer
def test_a_damaged_checkpoint_is_one_line_offering_the_previous_one(run, capsys, damage, with_config):
    ckpt = run / "checkpoint.pt"
    data = ckpt.read_bytes()
    junk = {"truncated": data[:len(data) // 2], "random bytes": os.urandom(4096),
            "pickle-like": b"\x80\xc2" + os.urandom(4094)}
    ckpt.write_bytes(junk[damage])
    config = ["--config", str(run / "train_config.json")] if with_config else []
    assert main(["pretrain", "--resume", str(ckpt), *config, "--no-progress"]) == 2
    line = one_line(capsys.readouterr().err)
    assert f"{ckpt} is damaged" in line and f"--resume {run / 'checkpoint.prev.pt'}" in line
    with pytest.raises(CheckpointError, match="is damaged"):
        Trainer(TrainConfig.load(None, TINY), run, resume=ckpt)
    (run / "checkpoint.prev.pt").unlink()  # no good one left to offer
    assert main(["pretrain", "--resume", str(ckpt), *config, "--no-progress"]) == 2
    assert "prev" not in one_line(capsys.readouterr().err)


def test_a_model_export_is_not_a_training_checkpoint(run):
    with pytest.raises(CheckpointError, match="is not a training checkpoint"):
        read_checkpoint(run / "model" / "model.pth")


def test_resume_auto_takes_the_newest_good_checkpoint(run, capsys):
    data = (run / "checkpoint.pt").read_bytes()
    (run / "checkpoint.pt").write_bytes(data[:1000])
    assert main(["pretrain", "--resume", "auto", "--out", str(run), "--no-progress"]) == 0
    captured = capsys.readouterr()
    assert "checkpoint.pt is damaged" in one_line(captured.err) and "resuming from" in captured.err
    assert json.loads(captured.out.splitlines()[-1])["global_step"] == 3  # resumed at 2, one step to go
    # the damaged file was overwritten, not kept as the previous checkpoint
    assert step_of(run / "checkpoint.pt") == 3 and step_of(run / "checkpoint.prev.pt") == 2
    steps = [json.loads(line)["step"] for line in (run / "log.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3]


def test_resume_auto_starts_fresh_in_an_empty_folder_and_refuses_only_damaged_ones(tmp_path, capsys):
    out = tmp_path / "new"
    assert main(["pretrain", *TINY, "max_steps=1", "--resume", "auto", "--out", str(out), "--no-progress"]) == 0
    assert "starting fresh" in one_line(capsys.readouterr().err)
    assert step_of(out / "checkpoint.pt") == 1
    for name in ("checkpoint.pt", "checkpoint.prev.pt"):
        (out / name).write_bytes(b"garbage")
    assert main(["pretrain", *TINY, "--resume", "auto", "--out", str(out), "--no-progress"]) == 2
    assert "no readable checkpoint" in one_line(capsys.readouterr().err)


def full_disk(monkeypatch, after=0):
    """torch.save that writes a little, then fails as on a full disk (after `after` good saves)."""
    real, calls = torch.save, []

    def save(obj, f, *a, **kw):
        calls.append(1)
        if len(calls) <= after:
            return real(obj, f, *a, **kw)
        f.write(b"\0" * 1000)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(torch, "save", save)


def test_a_full_disk_leaves_the_previous_files_intact(run, monkeypatch):
    trainer = Trainer(TrainConfig.load(None, TINY), run, resume=run / "checkpoint.pt")
    before = {p.name: p.read_bytes() for p in (run / "checkpoint.pt", run / "checkpoint.prev.pt",
                                                run / "model" / "model.pth")}
    full_disk(monkeypatch)
    for write, name in ((trainer.save, "checkpoint.pt"), (trainer.export_model, "model.pth")):
        with pytest.raises(OSError, match=f"cannot write .*{name}: No space left") as e:
            write()
        assert e.value.errno == errno.ENOSPC
    monkeypatch.undo()
    after = {p.name: p.read_bytes() for p in (run / "checkpoint.pt", run / "checkpoint.prev.pt",
                                               run / "model" / "model.pth")}
    assert after == before and step_of(run / "checkpoint.pt") == 3
    assert not list(run.rglob("*.tmp"))


def test_a_full_disk_is_one_line_from_the_cli(tmp_path, monkeypatch, capsys):
    full_disk(monkeypatch, after=1)  # the step-2 checkpoint is written, the epoch-end one fails
    assert main(["pretrain", *TINY, "--out", str(tmp_path), "--no-progress"]) == 2
    assert "checkpoint.pt: No space left on device" in one_line(capsys.readouterr().err)
    monkeypatch.undo()
    assert step_of(tmp_path / "checkpoint.pt") == 2 and not list(tmp_path.glob("*.tmp"))


def test_one_run_per_folder(tmp_path):
    cfg = TrainConfig.load(None, TINY + ["max_steps=1"])
    held = lock_folder(tmp_path)  # as another process would (flock conflicts between open files too)
    busy = f"{tmp_path} is in use by another training run (pid {os.getpid()})"
    with pytest.raises(FolderBusy, match=re.escape(busy)):
        Trainer(cfg, tmp_path)
    held.close()
    with pytest.raises(CheckpointError):  # a failed construction releases the folder ...
        Trainer(cfg, tmp_path, resume=tmp_path / "missing.pt")
    Trainer(cfg, tmp_path).train()  # ... and so does train() when it returns
    Trainer(cfg, tmp_path, resume="auto").close()


def test_the_log_is_trimmed_back_to_the_checkpoint(tmp_path):
    log = tmp_path / "log.jsonl"
    log.write_text("".join(json.dumps({"step": s, "loss": 1.0}) + "\n" for s in range(1, 7)) + '{"step": 7, "lo')
    trim_log(log, 4)
    assert [json.loads(line)["step"] for line in log.read_text().splitlines()] == [1, 2, 3, 4]
