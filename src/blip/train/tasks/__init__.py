"""Training tasks. A task is a thin module over the shared model, loop and data layer:

- `MODEL_TASK`: the `BlipConfig.task` of the model it trains (which parts exist);
- `Objective(model, **options)`: `forward(batch, StepInfo) -> {"loss": scalar, other scalars}`;
  options named like TrainConfig keys (queue_size, alpha, label_smoothing, ...) are filled from the config;
- `train_dataset(cfg, image_size, rank, world)`: the training items (map-style or a stream);
- `collate(cfg)`: items -> batch (tensors stacked; texts stay lists of str: objectives tokenise);
- optional `build_model(config)` (a model other than `Blip`, e.g. NLVR2's) and
  `adapt_state_dict(sd, model)` (e.g. NLVR2's duplicated cross-attention from a pretrained checkpoint).

Validation and the best-checkpoint rule live in `blip.eval.<task>` (`evaluate`, `score`).
"""
from __future__ import annotations

import dataclasses
import importlib
import inspect
from types import ModuleType

TASKS = ("pretrain", "caption", "retrieval", "vqa", "nlvr")


def task_module(task: str) -> ModuleType:
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; expected one of {', '.join(TASKS)}")
    return importlib.import_module(f"{__name__}.{task}")


TASK_DEFAULT_KEYS = ("max_length", "alpha_ramp_epochs")  # TrainConfig's None here means "the task's default"


def objective_options(task: str, cfg) -> dict:
    """The Objective's keyword arguments that TrainConfig has a key of the same name for (except a
    TASK_DEFAULT_KEYS key left at None), then `cfg.task_options` on top."""
    params = inspect.signature(task_module(task).Objective.__init__).parameters
    fields = {f.name for f in dataclasses.fields(cfg)}
    # these keys left at None take the objective's own default (max_length: caption 40, retrieval 35); any other
    # None is passed on as a value (itm_hard_from=None: never mine ITM negatives)
    options = {k: getattr(cfg, k) for k in params if k in fields and k not in ("self", "model")
               and not (k in TASK_DEFAULT_KEYS and getattr(cfg, k) is None)}
    unknown = set(cfg.task_options) - set(params)
    if unknown and not any(p.kind is p.VAR_KEYWORD for p in params.values()):
        raise ValueError(f"task_options {sorted(unknown)} are not options of the {task} objective "
                         f"(it takes {sorted(k for k in params if k not in ('self', 'model'))})")
    return {**options, **cfg.task_options}


def build_objective(task: str, model, **options):
    """The training objective of `task` around `model`, usable from one's own loop: a module whose
    forward takes a batch dict (see the task module) and returns named losses plus "loss"."""
    return task_module(task).Objective(model, **options)
