"""Evaluation protocols, one module per task, each with

- `evaluate(model, data, image_root=None, *, out_dir=None, progress=False, **options) -> dict`:
  the task's metrics on an annotation file in the official format (and its results file in out_dir);
- `score(metrics) -> float`: the official rule that picks the best finetuning epoch;
- `RULE`: that rule in words (best.json says it).

`blip evaluate --task T` and finetuning's per-epoch validation both call `evaluate(task, ...)`.
"""
from __future__ import annotations

import importlib
from types import ModuleType

TASKS = ("caption", "retrieval", "vqa", "nlvr")
MODEL_TASKS = {"caption": "caption", "retrieval": "retrieval", "vqa": "vqa", "nlvr": "nlvr"}


def eval_module(task: str) -> ModuleType:
    if task not in TASKS:
        raise ValueError(f"unknown evaluation task {task!r}; expected one of {', '.join(TASKS)}")
    return importlib.import_module(f"{__name__}.{task}")


def evaluate(task: str, model, data, image_root=None, **options) -> dict:
    return eval_module(task).evaluate(model, data, image_root, **options)


def score(task: str, metrics: dict) -> float:
    return float(eval_module(task).score(metrics))
