"""Image-text retrieval: TR/IR@1/5/10 and r_mean (the official `train_retrieval.evaluation`)."""
from __future__ import annotations

from ..evaluate import evaluate_retrieval, load_retrieval_annotation, recall_at_k, retrieval_scores

RULE = "highest r_mean (mean of TR/IR@1/5/10), as the official train_retrieval.py"
__all__ = ["RULE", "evaluate", "load_retrieval_annotation", "recall_at_k", "retrieval_scores", "score"]


def evaluate(model, data, image_root=None, *, out_dir=None, progress=False, k_test: int = 256, **_):
    return evaluate_retrieval(model, data, image_root, k_test=k_test, progress=progress)


def score(metrics: dict) -> float:
    return metrics["r_mean"]
