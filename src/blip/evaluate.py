"""Former home of the retrieval evaluation, now `blip.eval.retrieval`: re-exported so old imports work."""
from .eval.retrieval import evaluate_retrieval, load_retrieval_annotation, recall_at_k, retrieval_scores

__all__ = ["evaluate_retrieval", "load_retrieval_annotation", "recall_at_k", "retrieval_scores"]
