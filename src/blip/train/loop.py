"""One training loop for pretraining and (later) finetuning.

AdamW over all trainable parameters, a per-(epoch, step) learning-rate schedule, bf16 autocast,
gradient accumulation, DDP under torchrun, JSON-lines logs, and atomic checkpoints that resume
exactly: model + momentum state, optimizer, position in the data, and every RNG of every rank.
The objective is any module `objective(batch, StepInfo) -> {"loss": ..., other scalars}`.
"""
from __future__ import annotations

import contextlib
import json
import os
import random
import re
import time
from pathlib import Path

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel

from ..checkpoint import CheckpointError, load_torch_file
from ..model import Blip
from . import distributed as dist
from .config import TrainConfig
from .data import SeededItems, batches_per_epoch, build_dataset, make_loader
from .init_weights import load_bert_text, load_vit, summary
from .objectives import PretrainObjective, StepInfo
from .schedule import build_schedule

CHECKPOINT = "checkpoint.pt"


def build_objective(cfg: TrainConfig, model: Blip) -> torch.nn.Module:
    if cfg.task == "pretrain":
        return PretrainObjective(model, queue_size=cfg.queue_size, momentum=cfg.momentum, alpha=cfg.alpha,
                                 alpha_ramp_epochs=cfg.alpha_ramp_epochs, negatives_all_rank=cfg.negatives_all_rank,
                                 label_smoothing=cfg.label_smoothing, queue_init=cfg.queue_init)
    raise ValueError(f"no objective for task {cfg.task!r}")


# ------------------------------------------------------------------------------ RNG state
def rng_state() -> dict:
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": pos, "has_gauss": has_gauss,
                       "gauss": gauss}}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def atomic_save(obj, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


# ------------------------------------------------------------------------------ state dicts
def _flat(key: str) -> str:
    head, _, rest = key.partition(".")
    return rest if head in ("model", "momentum") else key


def flat_state_dict(objective: torch.nn.Module) -> dict:
    """Objective state in the official layout (`visual_encoder.*`, `visual_encoder_m.*`, `image_queue`)."""
    return {_flat(k): v for k, v in objective.state_dict().items()}


def load_flat_state_dict(objective: torch.nn.Module, sd: dict) -> None:
    names = {_flat(k): k for k in objective.state_dict()}
    missing = set(names) - set(sd)
    if missing:
        raise ValueError(f"checkpoint lacks {len(missing)} tensors, e.g. {sorted(missing)[:3]}")
    objective.load_state_dict({names[k]: v for k, v in sd.items() if k in names})


# ------------------------------------------------------------------------------ the trainer
def read_training_checkpoint(path: str | Path) -> dict:
    """What `Trainer.save` wrote, or a CheckpointError naming the file (truncated, or another kind)."""
    ckpt = load_torch_file(path, mmap=False)
    keys = set(ckpt) if isinstance(ckpt, dict) else set()
    missing = sorted({"model", "optimizer", "progress", "rng", "train_config"} - keys)
    if missing:
        raise CheckpointError(f"{path} is not a training checkpoint (out/checkpoint.pt): it lacks {', '.join(missing)}")
    return ckpt


class Trainer:
    def __init__(self, cfg: TrainConfig, out_dir: str | Path, resume: str | Path | None = None,
                 dataset=None, objective_fn=build_objective):
        self.cfg, self.out = cfg, Path(out_dir)
        self.device = dist.setup(cfg.device)
        self.rank, self.world = dist.rank(), dist.world_size()
        self.main = self.rank == 0
        torch.manual_seed(cfg.seed)  # identical initial weights and queues on every rank
        model = Blip(cfg.model_config())
        self.init_report = self._init_weights(model)
        self.objective = objective_fn(cfg, model).to(self.device)
        self.model = model
        if cfg.task == "pretrain" and cfg.queue_size % (cfg.batch_size * self.world):
            raise ValueError(f"queue_size {cfg.queue_size} must be a multiple of the global batch "
                             f"{cfg.batch_size * self.world}")
        self.optimizer = torch.optim.AdamW(self._param_groups(), lr=cfg.init_lr,
                                           weight_decay=cfg.weight_decay, foreach=True)
        self.schedule = build_schedule(cfg.schedule, init_lr=cfg.init_lr, min_lr=cfg.min_lr, decay=cfg.lr_decay,
                                       warmup_lr=cfg.warmup_lr, warmup_steps=cfg.warmup_steps, epochs=cfg.epochs)
        self.net = self.objective
        if self.world > 1:  # queues stay equal by construction: no per-step buffer broadcast
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.net = DistributedDataParallel(self.objective, device_ids=ids, broadcast_buffers=False)
        if dataset is None:
            dataset = build_dataset(cfg, model.config.vision.image_size, self.rank, self.world)
        if not isinstance(dataset, torch.utils.data.IterableDataset) and not isinstance(dataset, SeededItems):
            dataset = SeededItems(dataset, seed=cfg.seed)
        self.dataset = dataset
        micro = batches_per_epoch(dataset, cfg, self.world)
        available = micro // cfg.grad_accum if micro is not None else cfg.steps_per_epoch
        self.steps_per_epoch = min(cfg.steps_per_epoch, available) if cfg.steps_per_epoch else available
        if self.steps_per_epoch < 1:
            raise ValueError("the data gives less than one optimizer step per epoch (or set steps_per_epoch)")
        self.epoch = self.step = self.global_step = 0
        seed_all(cfg.seed + self.rank)
        if resume:
            self.load(resume)

    def _param_groups(self) -> list[dict]:
        """All trainable parameters, one AdamW group per lr multiplier: a parameter takes the scale of
        the first `cfg.lr_scales` pattern found (re.search) in its name (official layout, e.g.
        `visual_encoder.blocks.0.attn.qkv.weight`), else 1. The schedule's lr times the scale is set
        on the group every step."""
        groups: dict[float, list] = {}
        patterns = [(re.compile(k), float(v)) for k, v in self.cfg.lr_scales.items()]
        for name, p in self.objective.named_parameters():
            if p.requires_grad:
                name = _flat(name)
                scale = next((v for rx, v in patterns if rx.search(name)), 1.0)
                groups.setdefault(scale, []).append(p)
        return [{"params": ps, "lr_scale": scale} for scale, ps in sorted(groups.items())]

    def _init_weights(self, model: Blip) -> dict:
        report = {}
        if self.cfg.init_text:
            report["text"] = load_bert_text(model, self.cfg.init_text)
        if self.cfg.init_vision:
            report["vision"] = load_vit(model.visual_encoder, self.cfg.init_vision)
        if self.main:
            for part, r in report.items():
                print(f"blip: {part} init: {summary(r)}", flush=True)
        return report

    # -------------------------------------------------------------- checkpoints
    def state(self) -> dict:
        rngs = dist.all_objects(rng_state())
        return {"model": {k: v.detach().cpu() for k, v in flat_state_dict(self.objective).items()},
                "optimizer": self.optimizer.state_dict(),
                "progress": {"epoch": self.epoch, "step": self.step, "global_step": self.global_step,
                             "steps_per_epoch": self.steps_per_epoch, "world_size": self.world},
                "rng": rngs, "train_config": self.cfg.to_dict(), "model_config": self.model.config.to_dict()}

    def save(self, path: str | Path | None = None) -> Path:
        path = Path(path or self.out / CHECKPOINT)
        state = self.state()  # every rank takes part (RNG gather)
        if self.main:
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_save(state, path)
        dist.barrier()
        return path

    def load(self, path: str | Path) -> None:
        ckpt = read_training_checkpoint(path)
        load_flat_state_dict(self.objective, ckpt["model"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        p = ckpt["progress"]
        self.epoch, self.step, self.global_step = p["epoch"], p["step"], p["global_step"]
        if p["world_size"] == self.world:
            set_rng_state(ckpt["rng"][self.rank])
        else:  # another number of processes cannot replay exactly: keep the pair count, fresh seeds
            if self.step and self.main:
                print(f"blip: warning: resuming mid-epoch with {self.world} processes instead of "
                      f"{p['world_size']}: the rest of this epoch is not the same data", flush=True)
            self.step = self.step * p["world_size"] // self.world
            seed_all(self.cfg.seed + self.rank + 1000 * self.global_step)

    def export_model(self, folder: str | Path | None = None) -> Path:
        """The trained model (no momentum state) as a folder `blip.load` reads."""
        folder = Path(folder or self.out / "model")
        if self.main:
            folder.mkdir(parents=True, exist_ok=True)
            atomic_save({"model": {k: v.detach().cpu() for k, v in self.model.state_dict().items()}},
                        folder / "model.pth")
            data = {"format": "blip", **self.model.config.to_dict()}
            (folder / "config.json").write_text(json.dumps(data, indent=2) + "\n")
        dist.barrier()
        return folder

    # -------------------------------------------------------------- training
    def _batches(self):
        """(batch) per micro-step of the current epoch from the current position; stops on every
        rank together when any rank's stream ends."""
        loader = make_loader(self.dataset, self.cfg, self.rank, self.world, self.epoch,
                             skip_batches=self.step * self.cfg.grad_accum)
        uneven = isinstance(self.dataset, torch.utils.data.IterableDataset)
        it = iter(loader)
        while True:
            batch = next(it, None)
            if dist.any_across(batch is None, self.device) if uneven else batch is None:
                return
            yield {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}

    def train_epoch(self, log) -> bool:
        """Runs until the epoch ends (True) or max_steps is reached (False)."""
        cfg = self.cfg
        batches = self._batches()
        bar = None
        if self.main and cfg.progress:
            from tqdm import tqdm
            bar = tqdm(total=self.steps_per_epoch, initial=self.step, desc=f"epoch {self.epoch}", unit="step",
                       dynamic_ncols=True)
        try:
            while self.step < self.steps_per_epoch:
                if cfg.max_steps and self.global_step >= cfg.max_steps:
                    return False
                if not self.train_step(batches, log):
                    break
                if bar:
                    bar.update(1)
                    bar.set_postfix(loss=f"{log.last_loss:.3f}")
                if cfg.ckpt_interval and self.global_step % cfg.ckpt_interval == 0:
                    self.save()
        finally:
            if bar:
                bar.close()
        return True

    def train_step(self, batches, log) -> bool:
        cfg = self.cfg
        lr = self.schedule(self.epoch, self.step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)
        for micro in range(cfg.grad_accum):
            batch = next(batches, None)
            if batch is None:
                self.optimizer.zero_grad(set_to_none=True)
                return False
            info = StepInfo(self.epoch, self.step, self.steps_per_epoch, first_micro_batch=micro == 0)
            sync = self.net.no_sync() if self.world > 1 and micro < cfg.grad_accum - 1 else contextlib.nullcontext()
            with sync:
                with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=cfg.bf16):
                    out = self.net(batch, info)
                (out["loss"] / cfg.grad_accum).backward()
            log.add(out, batch["image"].shape[0] * self.world)
        if cfg.grad_clip:
            torch.nn.utils.clip_grad_norm_(self.objective.parameters(), cfg.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        self.global_step += 1
        if self.global_step % cfg.log_interval == 0 or self.step == self.steps_per_epoch:
            log.write(self, lr)
        return True

    def train(self) -> dict:
        if self.main:
            self.out.mkdir(parents=True, exist_ok=True)
            (self.out / "train_config.json").write_text(json.dumps(self.cfg.to_dict(), indent=2) + "\n")
        log = JsonLog(self.out / "log.jsonl" if self.main else None, self.device)
        self.objective.train()
        finished = True
        while self.epoch < self.cfg.epochs:
            if not self.train_epoch(log):
                finished = False
                break
            self.epoch, self.step = self.epoch + 1, 0
            self.save()
        if not finished:
            self.save()
        else:
            self.export_model()
        return {"epoch": self.epoch, "step": self.step, "global_step": self.global_step, "finished": finished,
                "pairs_per_s": log.rates[-1] if log.rates else None}


class JsonLog:
    """Averages the objective's scalars over a window and writes one JSON line per window (rank 0)."""

    def __init__(self, path: Path | None, device):
        self.path, self.device = path, device
        self.sums: dict[str, torch.Tensor] = {}
        self.count = self.pairs = 0
        self.start = time.perf_counter()
        self.logged_loss = float("nan")
        self.rates: list[float] = []

    @property
    def last_loss(self) -> float:
        """The running mean of the current window (the last logged one right after a write)."""
        return float(self.sums["loss"]) / self.count if self.count and "loss" in self.sums else self.logged_loss

    def add(self, out: dict, pairs: int) -> None:
        for k, v in out.items():
            v = v.detach().float() if torch.is_tensor(v) else torch.tensor(float(v))
            self.sums[k] = self.sums.get(k, 0) + v
        self.count += 1
        self.pairs += pairs

    def write(self, trainer: Trainer, lr: float) -> None:
        values = dist.mean_across({k: float(v) / self.count for k, v in self.sums.items()}, self.device)
        elapsed = time.perf_counter() - self.start
        rate = self.pairs / elapsed if elapsed > 0 else 0.0
        self.rates.append(rate)
        self.logged_loss = values.get("loss", float("nan"))
        record = {"step": trainer.global_step, "epoch": trainer.epoch, "epoch_step": trainer.step, "lr": lr,
                  **{k: round(v, 6) for k, v in values.items()}, "pairs_per_s": round(rate, 2)}
        if self.path is not None:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")
        self.sums, self.count, self.pairs, self.start = {}, 0, 0, time.perf_counter()
