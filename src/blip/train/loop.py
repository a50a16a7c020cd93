"""One training loop for pretraining and (later) finetuning.

AdamW over all trainable parameters, a per-(epoch, step) learning-rate schedule, bf16 autocast,
gradient accumulation, DDP under torchrun, JSON-lines logs, and atomic checkpoints that resume
exactly: model + momentum state, optimizer, position in the data, and every RNG of every rank.
The last two checkpoints are kept, damaged ones are refused in one line, and a lock keeps a second
run out of the output folder (README "Reliability").
The objective is any module `objective(batch, StepInfo) -> {"loss": ..., other scalars}`.
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import os
import random
import re
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel

from .. import vocab
from ..checkpoint import CheckpointError, torch_load
from ..factory import native_bf16
from ..model import Blip
from . import distributed as dist
from .config import TrainConfig
from . import tasks
from .data import SeededItems, WordSwap, batches_per_epoch, make_loader
from .init_weights import clip_init, load_bert_text, load_init, load_vit, read_init, summary, whiten_stem
from .objectives import PretrainObjective, StepInfo
from .schedule import build_schedule

CHECKPOINT = "checkpoint.pt"
LOCK = "train.lock"
_TRAIN_KEYS = ("model", "optimizer", "progress", "rng", "train_config")


def objective_from_config(cfg: TrainConfig, model) -> torch.nn.Module:
    """The objective of cfg.task around `model`, its options taken from the config (train/tasks)."""
    return tasks.build_objective(cfg.task, model, **tasks.objective_options(cfg.task, cfg))


def first_images(dataset, n: int = 256) -> torch.Tensor:
    """The images of the dataset's first n items (fewer if it has fewer), as the model sees them: the data the
    stem whitening is computed from. Items as the training batches get them (SeededItems: epoch 0's seeds);
    the global RNG state is left as it was."""
    state = rng_state()
    try:
        if isinstance(dataset, torch.utils.data.IterableDataset):
            items = [it for _, it in zip(range(n), dataset)]
        else:
            items = [dataset[i] for i in range(min(n, len(dataset)))]
    finally:
        set_rng_state(state)
    images = [it["image"] for it in items if it is not None]
    if not images:
        raise ValueError("whiten_stem: the training data has no images")
    return torch.stack(images).float()


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


# ------------------------------------------------------------------------------ files
def atomic_write(path: Path, write, previous: Path | None = None) -> None:
    """`write(f)` into `path`.tmp, synced, then renamed over `path`: a kill leaves the old file whole,
    an error (a full disk) also leaves no .tmp and raises OSError naming `path`. With `previous`, the
    old file is first renamed to it, so at every moment `path` or `previous` is a complete file."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        if previous is not None and path.exists():
            os.replace(path, previous)
        if path.name == os.environ.get("BLIP_TEST_PAUSE_SAVE"):  # test hook: tests/test_crash.py kills it here
            time.sleep(30)
        os.replace(tmp, path)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        if isinstance(e, OSError):
            raise OSError(e.errno, f"cannot write {path}: {e.strerror or e}") from e
        raise


def atomic_save(obj, path: Path, previous: Path | None = None) -> None:
    # a file object, not a path: torch's own writer reports a full disk as an obscure RuntimeError
    atomic_write(path, lambda f: torch.save(obj, f), previous)


def _write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda f: f.write(text.encode()))


def previous_of(path: Path) -> Path:
    """checkpoint.pt -> checkpoint.prev.pt: where a save moves the checkpoint it replaces."""
    return path.with_name(f"{path.stem}.prev{path.suffix}")


def read_checkpoint(path: str | Path, offer_previous: bool = True) -> dict:
    """A training checkpoint's contents; CheckpointError (one line) when the file is missing, damaged or
    not a training checkpoint, naming the previous checkpoint when that one reads."""
    path = Path(path)
    try:
        ckpt = torch_load(path)
        ok = isinstance(ckpt, dict) and all(k in ckpt for k in _TRAIN_KEYS)
        problem = None if ok else "is not a training checkpoint"
    except FileNotFoundError:
        problem = "does not exist"
    except Exception as e:  # truncated or overwritten: RuntimeError, UnpicklingError, EOFError, ...
        reason = re.split(r"\.\s", str(e).strip())[0][:100]  # torch's first sentence; the rest is advice
        problem = f"is damaged ({type(e).__name__}: {reason})"
    if problem is None:
        return ckpt
    older, hint = previous_of(path), ""
    if offer_previous and older.exists():
        with contextlib.suppress(CheckpointError):
            read_checkpoint(older, offer_previous=False)
            hint = f"; the previous checkpoint is good: --resume {older}"
    raise CheckpointError(f"checkpoint {path} {problem}{hint}")


def newest_checkpoint(folder: str | Path) -> tuple[Path, dict] | None:
    """`--resume auto`: the newest readable checkpoint in `folder` (checkpoint.pt, else
    checkpoint.prev.pt) with its contents, or None when the folder has none (a fresh start). When
    every one there is damaged that is an error, not a fresh start that would overwrite them."""
    current = Path(folder) / CHECKPOINT
    problems = []
    for path in (current, previous_of(current)):
        if path.exists():
            try:
                ckpt = read_checkpoint(path, offer_previous=False)
            except CheckpointError as e:
                problems.append(str(e))
                continue
            if problems:
                _note(f"blip: warning: {problems[0]}: resuming from {path}")
            return path, ckpt
    if problems:
        raise CheckpointError(f"no readable checkpoint in {folder}: {'; '.join(problems)}")
    _note(f"blip: no checkpoint in {folder}: starting fresh")
    return None


def _note(line: str) -> None:
    if int(os.environ.get("RANK", 0)) == 0:  # before the process group exists
        print(line, file=sys.stderr, flush=True)


def trim_log(path: Path, step: int) -> None:
    """Drop log lines past `step` (and a line cut short by a kill): a run resumed from the checkpoint
    at `step` logs those steps again, so the log continues from the checkpoint, each step once."""
    if not path.exists():
        return
    lines = path.read_text().splitlines()
    keep = []
    for line in lines:
        with contextlib.suppress(ValueError, KeyError, TypeError):
            if json.loads(line)["step"] <= step:
                keep.append(line)
    if len(keep) < len(lines):
        _write_text(path, "".join(line + "\n" for line in keep))


class FolderBusy(RuntimeError):
    """Another live process is training into this folder."""


def lock_folder(folder: Path):
    """An exclusive flock on folder/train.lock, which holds our pid, for as long as the returned file is
    open. The kernel drops it when the process dies, however it dies: a killed run never leaves it locked."""
    folder.mkdir(parents=True, exist_ok=True)
    f = open(folder / LOCK, "a+")  # not "w": that would erase the holder's pid before we know we may
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        pid = f.read().strip() or "unknown"
        f.close()
        raise FolderBusy(f"{folder} is in use by another training run (pid {pid})") from None
    f.truncate(0)
    f.write(f"{os.getpid()}\n")
    f.flush()
    return f


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
class Trainer:
    """Trains `cfg` into `out_dir` (checkpoint.pt, checkpoint.prev.pt, log.jsonl, model/), which it locks
    against a second run. `resume`: a checkpoint path, or "auto" for the newest good one in `out_dir`."""

    def __init__(self, cfg: TrainConfig, out_dir: str | Path, resume: str | Path | None = None,
                 dataset=None, objective_fn=objective_from_config):
        self.cfg, self.out = cfg, Path(out_dir)
        self.device = dist.setup(cfg.device)
        self.rank, self.world = dist.rank(), dist.world_size()
        self.main = self.rank == 0
        self.bf16 = cfg.bf16 and (cfg.bf16_emulated or native_bf16(self.device))
        if cfg.bf16 and not self.bf16 and self.main:
            print(f"blip: bf16 autocast off: this {self.device.type} has no native bf16 (emulated it is several "
                  f"times slower than fp32); training in fp32 (bf16_emulated=true forces it)", flush=True)
        self._lock = None
        self._good: set[Path] = set()  # checkpoint files known good: the only ones a save keeps as previous
        self._hold_folder()  # first: a second run on this folder stops before building anything
        try:
            self._build(dataset, objective_fn)
            if resume == "auto":
                found = newest_checkpoint(self.out)
                if found:
                    self._restore(*found)
            elif resume:
                self.load(resume)
        except BaseException:
            self.close()
            raise

    def _build(self, dataset, objective_fn) -> None:
        cfg = self.cfg
        torch.manual_seed(cfg.seed)  # identical initial weights and queues on every rank
        self.task = tasks.task_module(cfg.task)
        init = read_init(cfg.init) if cfg.init else None  # its architecture replaces the preset's
        model_config = cfg.model_config(base=init[0] if init else None)
        model = self.task.build_model(model_config) if hasattr(self.task, "build_model") else Blip(model_config)
        self.init_report = self._init_weights(model, init[1] if init else None)
        del init
        model = self._vocabulary(model)
        if dataset is None:
            dataset = self.task.train_dataset(cfg, model.config.vision.image_size, self.rank, self.world)
        if not isinstance(dataset, torch.utils.data.IterableDataset) and not isinstance(dataset, SeededItems):
            dataset = SeededItems(dataset, seed=cfg.seed, swap=WordSwap.build(
                cfg.itm_swap_words, cfg.itm_swap_pick, getattr(dataset, "captions", None)))
        self.dataset = dataset
        if cfg.whiten_stem:  # before the objective copies the towers into momentum ones; DDP then sends rank 0's
            images = first_images(dataset)
            filters = whiten_stem(model.visual_encoder, images)
            if self.main:
                print(f"blip: stem whitened: {filters} first-layer filters from the 3x3 patches of "
                      f"{len(images)} training images", flush=True)
        self.objective = objective_fn(cfg, model).to(self.device)
        self.model = model
        self.collate = self.task.collate(cfg)
        self.best: dict | None = None  # {"epoch", "score", "metrics"} of the best validated epoch
        if cfg.task == "pretrain" and cfg.queue_size % (cfg.batch_size * self.world):
            raise ValueError(f"queue_size {cfg.queue_size} must be a multiple of the global batch "
                             f"{cfg.batch_size * self.world}")
        # the fused kernel: one pass over each tensor (4x faster than foreach on CPU, where a small model's
        # step waits for it); the same update up to rounding
        fused = self.device.type in ("cpu", "cuda")
        self.optimizer = torch.optim.AdamW(self._param_groups(), lr=cfg.init_lr, weight_decay=cfg.weight_decay,
                                           fused=fused, foreach=None if fused else True)
        self.net = self.objective
        if self.world > 1:  # queues stay equal by construction: no per-step buffer broadcast
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.net = DistributedDataParallel(self.objective, device_ids=ids, broadcast_buffers=False,
                                               find_unused_parameters=cfg.itc_only_steps > 0)  # ITC-only steps
        micro = batches_per_epoch(dataset, cfg, self.world)
        available = micro // cfg.grad_accum if micro is not None else cfg.steps_per_epoch
        self.steps_per_epoch = min(cfg.steps_per_epoch, available) if cfg.steps_per_epoch else available
        if self.steps_per_epoch < 1:
            raise ValueError("the data gives less than one optimizer step per epoch (or set steps_per_epoch)")
        self.schedule = build_schedule(cfg.schedule, init_lr=cfg.init_lr, min_lr=cfg.min_lr, decay=cfg.lr_decay,
                                       warmup_lr=cfg.warmup_lr, warmup_steps=cfg.warmup_steps, epochs=cfg.epochs,
                                       steps_per_epoch=self.steps_per_epoch,
                                       total_steps=cfg.epochs * self.steps_per_epoch)
        self.epoch = self.step = self.global_step = 0
        seed_all(cfg.seed + self.rank)

    def _hold_folder(self) -> None:
        """One run per output folder (rank 0 holds the lock; the other ranks share the folder)."""
        if self.main and self._lock is None:
            self._lock = lock_folder(self.out)

    def close(self) -> None:
        """Releases the output folder (train() does when it returns)."""
        if self._lock is not None:
            self._lock.close()
            self._lock = None

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

    def _init_weights(self, model: Blip, init_sd: dict | None = None) -> dict:
        report = {}
        if self.cfg.init_scheme == "clip":  # before loading: loaded weights keep their values
            clip_init(model)
        if self.cfg.init_text:
            report["text"] = load_bert_text(model, self.cfg.init_text)
        if self.cfg.init_vision:
            report["vision"] = load_vit(model.visual_encoder, self.cfg.init_vision)
        if init_sd is not None:
            report["init"] = load_init(model, init_sd, adapt=getattr(self.task, "adapt_state_dict", None))
        if self.main:
            for part, r in report.items():
                print(f"blip: {part} init: {summary(r)}", flush=True)
        return report

    def _vocabulary(self, model):
        """Trimmed to `vocab_from`'s tokens; for a model trimmed before, a warning when the training text
        has tokens it lacks (they read as [UNK])."""
        cfg = self.cfg
        if cfg.vocab_from:
            build = getattr(self.task, "build_model", None)
            model = vocab.trim(model, vocab.corpus_token_ids(cfg.vocab_from), build=build)
            if self.main:
                print(f"blip: vocabulary trimmed to the {len(model.config.text.vocab_ids)} tokens of "
                      f"{', '.join(cfg.vocab_from)}", flush=True)
        elif model.config.text.vocab_ids is not None and cfg.train_files and self.main:
            share = vocab.unknown_share(model.config, vocab.corpus_texts(cfg.train_files))
            if share > 0:
                print(f"blip: warning: the model's trimmed vocabulary lacks {100 * share:.2f}% of the training "
                      "text's tokens; they read as [UNK]", flush=True)
        return model

    # -------------------------------------------------------------- checkpoints
    def state(self) -> dict:
        rngs = dist.all_objects(rng_state())
        return {"model": {k: v.detach().cpu() for k, v in flat_state_dict(self.objective).items()},
                "optimizer": self.optimizer.state_dict(),
                "progress": {"epoch": self.epoch, "step": self.step, "global_step": self.global_step,
                             "steps_per_epoch": self.steps_per_epoch, "world_size": self.world,
                             "best": self.best},
                "rng": rngs, "train_config": self.cfg.to_dict(), "model_config": self.model.config.to_dict()}

    def save(self, path: str | Path | None = None) -> Path:
        path = Path(path or self.out / CHECKPOINT)
        state = self.state()  # every rank takes part (RNG gather)
        if self.main:
            path.parent.mkdir(parents=True, exist_ok=True)
            # the replaced file becomes the previous checkpoint only when known good (saved or resumed
            # from by this trainer): a damaged or another run's file is overwritten, not kept
            known = path.resolve() in self._good
            atomic_save(state, path, previous=previous_of(path) if known else None)
            self._good.add(path.resolve())
        dist.barrier()
        return path

    def load(self, path: str | Path) -> None:
        self._restore(Path(path), read_checkpoint(path))

    def _restore(self, path: Path, ckpt: dict) -> None:
        self._good.add(path.resolve())
        load_flat_state_dict(self.objective, ckpt["model"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        p = ckpt["progress"]
        self.epoch, self.step, self.global_step = p["epoch"], p["step"], p["global_step"]
        self.best = p.get("best")
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
            _write_text(folder / "config.json", json.dumps(data, indent=2) + "\n")
        dist.barrier()
        return folder

    # -------------------------------------------------------------- training
    def _batches(self):
        """(batch) per micro-step of the current epoch from the current position; stops on every
        rank together when any rank's stream ends."""
        loader = make_loader(self.dataset, self.cfg, self.rank, self.world, self.epoch,
                             skip_batches=self.step * self.cfg.grad_accum, collate_fn=self.collate)
        uneven = isinstance(self.dataset, torch.utils.data.IterableDataset)
        it = iter(loader)
        while True:
            batch = next(it, None)
            if dist.any_across(batch is None, self.device) if uneven else batch is None:
                return
            yield {k: v.to(self.device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}

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
                with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
                    out = self.net(batch, info)
                (out["loss"] / cfg.grad_accum).backward()
            log.add(out, len(batch["image"]) * self.world)
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
        """Trains to the end (or max_steps), holding the output folder's lock meanwhile."""
        self._hold_folder()
        try:
            return self._train()
        finally:
            self.close()

    def _train(self) -> dict:
        if self.main:
            self.out.mkdir(parents=True, exist_ok=True)
            _write_text(self.out / "train_config.json", json.dumps(self.cfg.to_dict(), indent=2) + "\n")
            trim_log(self.out / "log.jsonl", self.global_step)
        log = JsonLog(self.out / "log.jsonl" if self.main else None, self.device)
        self.objective.train()
        finished = True
        while self.epoch < self.cfg.epochs:
            if not self.train_epoch(log):
                finished = False
                break
            self.epoch, self.step = self.epoch + 1, 0
            if self.cfg.val_file:
                self.validate(self.epoch - 1)
                log.start = time.perf_counter()  # the next window's pairs_per_s leaves validation out
            self.save()
        if not finished:
            self.save()
        elif not self.cfg.val_file:
            self.export_model()  # with validation, the best epoch's model is already there
        result = {"epoch": self.epoch, "step": self.step, "global_step": self.global_step, "finished": finished,
                  "pairs_per_s": log.rates[-1] if log.rates else None, "bf16": self.bf16}
        if self.best is not None:
            result["best"] = {k: self.best[k] for k in ("epoch", "score")}
        if finished and self.cfg.test_file:
            result["test"] = self.test()
        return result

    # -------------------------------------------------------------- validation
    def _shared_eval(self) -> bool:
        """Whether every rank takes part in evaluation (retrieval splits its images and ITM reranking over the
        ranks); the other tasks' evaluation runs on rank 0 while the others wait."""
        return self.world > 1 and self.cfg.task == "retrieval"

    def _evaluate(self, model, data: str, out_dir: Path | None) -> dict:
        from .. import eval as evaluation
        options = dict(self.cfg.eval_options)
        if self._shared_eval():
            options.setdefault("distributed", True)
        if self.cfg.answer_list and self.cfg.task == "vqa":
            options.setdefault("answers", self.cfg.answer_list)
        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
            return evaluation.evaluate(self.cfg.task, model, data, self.cfg.image_root, out_dir=out_dir,
                                       progress=self.cfg.progress, **options)

    def validate(self, epoch: int) -> dict | None:
        """The task's metric on val_file after `epoch` (retrieval: split over the ranks; the others: rank 0 while
        the rest wait). A better score than every earlier epoch's exports the model to out/model and writes
        out/best.json."""
        from .. import eval as evaluation
        metrics = None
        if self.main or self._shared_eval():
            self.model.eval()
            try:
                metrics = self._evaluate(self.model, self.cfg.val_file, self.out / "val" / f"epoch{epoch}")
            finally:
                self.objective.train()
        if self.main:
            score = evaluation.score(self.cfg.task, metrics)
            with open(self.out / "log.jsonl", "a") as f:
                f.write(json.dumps({"step": self.global_step, "epoch": epoch, "val": metrics, "val_score": score}) + "\n")
            if self.best is None or score > self.best["score"]:
                self.best = {"epoch": epoch, "score": score, "metrics": metrics}
        self.best = dist.broadcast_object(self.best)
        if self.best["epoch"] == epoch:
            self.export_model()
            if self.main:
                rule = evaluation.eval_module(self.cfg.task).RULE
                _write_text(self.out / "best.json", json.dumps(
                    {"epoch": epoch, "global_step": self.global_step, "score": self.best["score"], "rule": rule,
                     "val_file": self.cfg.val_file, "metrics": self.best["metrics"]}, indent=2) + "\n")
        return metrics

    def test(self) -> dict | None:
        """test_file's metrics with the exported (best) model, written to out/test.json (rank 0)."""
        if not self.main:
            return None
        from ..factory import load
        model = load(self.out / "model", device=self.device)
        metrics = self._evaluate(model, self.cfg.test_file, self.out / "test")
        _write_text(self.out / "test.json", json.dumps(metrics, indent=2) + "\n")
        return metrics


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
