"""NLVR2: accuracy of the True/False prediction (the official `train_nlvr.evaluate`).

The annotation files (`nlvr_{train,dev,test}.json`) are lists of
`{"images": [first, second], "sentence": str, "label": "True" | "False", ...}`, image paths relative to
the image root (default: the JSON file's folder). Unlike the official evaluation, which passes each pair
through the training set's random order swap (label-preserving), pairs are scored in the order given, so
the accuracy is the same on every run.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from ..data.annotation import read_json_list

RULE = "highest accuracy on the dev set, as the official train_nlvr.py"
__all__ = ["RULE", "Example", "evaluate", "load_annotation", "score"]


@dataclass
class Example:
    images: tuple[str, str]  # resolved paths
    sentence: str
    label: bool
    entry: dict  # the annotation entry as read


def load_annotation(path: str | Path, image_root: str | Path | None = None) -> list[Example]:
    """The examples of an NLVR2 annotation file; a ValueError naming the file and entry for anything that is
    not one (a caption or VQA file, a label other than "True"/"False", a missing image)."""
    path = Path(path)
    data = read_json_list(path, "NLVR2 annotation", "NLVR2 examples")
    root = Path(image_root) if image_root is not None else path.parent
    out = []
    for i, entry in enumerate(data):
        images = entry.get("images") if isinstance(entry, dict) else None
        if (not isinstance(images, list) or len(images) != 2 or not all(isinstance(p, str) for p in images)
                or not isinstance(entry.get("sentence"), str)):
            hint = "; this looks like a caption/retrieval file" if isinstance(entry, dict) and "image" in entry else ""
            raise ValueError(f"{path}: entry {i} is not an NLVR2 example ({{\"images\": [two paths], \"sentence\", "
                             f"\"label\"}}){hint}")
        label = entry.get("label")
        if label not in ("True", "False", True, False):
            raise ValueError(f"{path}: entry {i} has label {label!r}; expected \"True\" or \"False\"")
        resolved = tuple(p if os.path.isabs(p) else str(root / p) for p in images)
        for p in resolved:
            if not os.path.isfile(p):
                raise ValueError(f"{path}: entry {i}: image not found: {p}")
        out.append(Example(resolved, entry["sentence"], label in ("True", True), entry))
    return out


@torch.inference_mode()
def evaluate(model, data, image_root=None, *, out_dir=None, progress: bool = False, batch_size: int = 32, **_) -> dict:
    """{"acc": percent correct, "n": examples} of a BlipNLVR on an annotation file (or a list of Examples);
    with out_dir, the predictions go to out_dir/nlvr_predictions.json (each entry with "prediction")."""
    if not hasattr(model, "cls_head"):
        raise ValueError(f"NLVR2 evaluation needs an NLVR2 model; this is a '{model.config.task}' model")
    examples = data if isinstance(data, list) else load_annotation(data, image_root)
    preds = []
    for start in tqdm(range(0, len(examples), batch_size), disable=not progress, desc="nlvr", unit="batch"):
        chunk = examples[start:start + batch_size]
        logits = model.logits([e.images[0] for e in chunk], [e.images[1] for e in chunk], [e.sentence for e in chunk])
        preds += logits.argmax(-1).bool().tolist()
    correct = sum(p == e.label for p, e in zip(preds, examples))
    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        rows = [{**e.entry, "prediction": str(p)} for p, e in zip(preds, examples)]
        (out / "nlvr_predictions.json").write_text(json.dumps(rows, indent=1) + "\n")
    return {"acc": 100.0 * correct / len(examples), "n": len(examples)}


def score(metrics: dict) -> float:
    return metrics["acc"]
