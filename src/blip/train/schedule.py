"""Learning-rate schedules as pure functions of (epoch, step in epoch): resuming needs no state.

`step_warmup` is the official pretraining schedule, `cosine` the official finetuning one; `warmup_cosine`
(linear warmup, then a per-step cosine to min_lr over the whole run) suits short runs of a few hundred steps,
where a per-epoch schedule changes the lr only once or twice.
"""
from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass
class StepWarmup:
    """Epoch 0: linear per-step warmup from warmup_lr to init_lr over warmup_steps (then init_lr);
    epoch e >= 1: max(min_lr, init_lr * decay**e) for the whole epoch (official `step_lr_schedule`)."""
    init_lr: float = 3e-4
    min_lr: float = 1e-6
    decay: float = 0.9
    warmup_lr: float = 1e-6
    warmup_steps: int = 3000

    def __call__(self, epoch: int, step: int) -> float:
        if epoch == 0 and self.warmup_steps > 0:
            return min(self.init_lr, self.warmup_lr + (self.init_lr - self.warmup_lr) * step / self.warmup_steps)
        return max(self.min_lr, self.init_lr * self.decay ** epoch)


@dataclass
class Cosine:
    """lr = (init_lr - min_lr) * 0.5 * (1 + cos(pi * epoch / epochs)) + min_lr, set once per epoch
    (official `cosine_lr_schedule`, used for every finetuning task)."""
    init_lr: float = 1e-5
    min_lr: float = 0.0
    epochs: int = 1

    def __call__(self, epoch: int, step: int) -> float:
        return (self.init_lr - self.min_lr) * 0.5 * (1.0 + math.cos(math.pi * epoch / self.epochs)) + self.min_lr


@dataclass
class WarmupCosine:
    """Global step g = epoch * steps_per_epoch + step: linear from warmup_lr to init_lr over warmup_steps,
    then min_lr + (init_lr - min_lr) * 0.5 * (1 + cos(pi * (g - warmup) / (total - warmup)))."""
    init_lr: float = 1e-3
    min_lr: float = 1e-6
    warmup_lr: float = 1e-6
    warmup_steps: int = 50
    steps_per_epoch: int = 1
    total_steps: int = 1

    def __call__(self, epoch: int, step: int) -> float:
        g = epoch * self.steps_per_epoch + step
        if g < self.warmup_steps:
            return self.warmup_lr + (self.init_lr - self.warmup_lr) * g / self.warmup_steps
        t = min(1.0, (g - self.warmup_steps) / max(1, self.total_steps - self.warmup_steps))
        return self.min_lr + (self.init_lr - self.min_lr) * 0.5 * (1.0 + math.cos(math.pi * t))


SCHEDULES = ("step_warmup", "cosine", "warmup_cosine")


def build_schedule(name: str, *, init_lr: float, min_lr: float, decay: float, warmup_lr: float,
                   warmup_steps: int, epochs: int, steps_per_epoch: int = 1, total_steps: int = 1):
    if name == "step_warmup":
        return StepWarmup(init_lr, min_lr, decay, warmup_lr, warmup_steps)
    if name == "cosine":
        return Cosine(init_lr, min_lr, epochs)
    if name == "warmup_cosine":
        return WarmupCosine(init_lr, min_lr, warmup_lr, warmup_steps, steps_per_epoch, total_steps)
    raise ValueError(f"unknown schedule {name!r}; expected one of {', '.join(SCHEDULES)}")
