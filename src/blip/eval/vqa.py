"""VQA: answers for an official-format question file, the submission JSON, and VQA accuracy.

The file is a JSON list of {"question_id", "image", "question", "answer"?: [human answers],
"dataset"?: "vqa" | "vg", "question_type"?, "answer_type"?} (vqa_test.json has no answers: its
results go to the evaluation server). Inference is the official rank over an answer list
(answer_list.json; top k_test candidates by first-token probability, then sequence likelihood) or
generation (beam 3, at most 10 tokens).
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from ..data.annotation import read_json_list
from ..transform import image_batches
from .vqa_normalize import normalize_answer, vqa_accuracy

RULE = ("highest VQA accuracy on val_file; the official train_vqa.py trains a fixed 10 epochs and submits "
        "the last epoch's test-dev answers to the server without validating")
__all__ = ["RULE", "evaluate", "load_answer_list", "load_questions", "normalize_answer", "score", "vqa_accuracy"]


def resolve_root(image_root, path: Path, dataset: str):
    """The folder an entry's image path is relative to: image_root (a folder, or {"vqa": folder,
    "vg": folder} as the official vqa_root / vg_root), else the annotation file's folder."""
    if isinstance(image_root, dict):
        if dataset not in image_root:
            raise ValueError(f"{path}: image_root has no folder for dataset {dataset!r} "
                             f"(it names {sorted(image_root)})")
        return Path(image_root[dataset])
    return Path(image_root) if image_root else path.parent


def load_questions(path, image_root=None) -> list[dict]:
    """Entries {"question_id", "image" (resolved), "question", "answers" (None without), "question_type",
    "answer_type"}; ValueError / OSError naming the file for a bad file, entry or missing image."""
    path = Path(path)
    data = read_json_list(path, "VQA question", "VQA questions")
    out = []
    for k, e in enumerate(data):
        if not isinstance(e, dict) or not isinstance(e.get("question"), str) or not isinstance(e.get("image"), str):
            raise ValueError(f"{path}: entry {k} is not a VQA question (needs \"image\" and \"question\"; "
                             f"got keys {sorted(e) if isinstance(e, dict) else type(e).__name__})")
        answers = e.get("answer")
        if isinstance(answers, str):
            answers = [answers]
        if answers is not None and (not isinstance(answers, list) or not answers
                                    or not all(isinstance(a, str) for a in answers)):
            raise ValueError(f"{path}: entry {k}: \"answer\" must be a non-empty list of strings")
        root = resolve_root(image_root, path, e.get("dataset", "vqa"))
        image = e["image"] if os.path.isabs(e["image"]) else str(root / e["image"])
        out.append({"question_id": e.get("question_id", k), "image": image, "question": e["question"],
                    "answers": answers, "question_type": e.get("question_type"), "answer_type": e.get("answer_type")})
    missing = next((e["image"] for e in out if not os.path.isfile(e["image"])), None)
    if missing:
        raise OSError(f"{path}: image not found: {missing} (set image_root / --image-root)")
    return out


def load_answer_list(answers) -> list[str]:
    """answer_list.json (a JSON list of strings) or a list of strings."""
    if isinstance(answers, (str, os.PathLike)):
        try:
            answers = json.loads(Path(answers).read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise OSError(f"answer list not found: {answers}") from None
        except ValueError as e:
            raise ValueError(f"{answers} is not a JSON file: {e}") from None
    if not isinstance(answers, list) or not answers or not all(isinstance(a, str) for a in answers):
        raise ValueError("the answer list must be a non-empty JSON list of strings")
    return answers


def evaluate(model, data, image_root=None, *, out_dir=None, progress=False, answers=None, inference=None,
             k_test: int = 128, batch_size: int = 16, **_) -> dict:
    """Answers every question of `data` (a file path or load_questions' entries); writes
    out_dir/vqa_result.json [{"question_id", "answer"}] when out_dir is given. Returns
    {"questions": n} plus, when the file has human answers, "acc" (VQA accuracy, percent) and the
    accuracy per question / answer type where the file names them."""
    inference = inference or ("rank" if answers is not None else "generate")
    if inference not in ("rank", "generate"):
        raise ValueError(f"inference must be 'rank' or 'generate', not {inference!r}")
    if inference == "rank" and answers is None:
        raise ValueError("rank inference needs the candidate answers (answers=answer_list.json, --answers)")
    answer_list = load_answer_list(answers) if inference == "rank" else None
    entries = load_questions(data, image_root) if not isinstance(data, list) else data
    batches = image_batches([e["image"] for e in entries], model.config.vision.image_size, batch_size)
    if progress:
        from tqdm import tqdm
        batches = tqdm(batches, total=-(-len(entries) // batch_size), unit="batch", desc="vqa", leave=False)
    predictions = []
    for start, images in zip(range(0, len(entries), batch_size), batches):
        questions = [e["question"] for e in entries[start:start + batch_size]]
        predictions += model.answer(images, questions, answer_list, k_test=k_test)
    results = [{"question_id": e["question_id"], "answer": a} for e, a in zip(entries, predictions)]
    metrics: dict = {"questions": len(entries)}
    if out_dir is not None:
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        result_file = Path(out_dir) / "vqa_result.json"
        result_file.write_text(json.dumps(results) + "\n")
        metrics["result_file"] = str(result_file)
    if all(e["answers"] is not None for e in entries):
        accs = [vqa_accuracy(a, e["answers"]) for e, a in zip(entries, predictions)]
        metrics["acc"] = 100.0 * sum(accs) / len(accs)
        for kind in ("question_type", "answer_type"):
            groups: dict = {}
            for e, acc in zip(entries, accs):
                if e[kind] is not None:
                    groups.setdefault(e[kind], []).append(acc)
            if groups:
                metrics[f"acc_per_{kind}"] = {t: 100.0 * sum(v) / len(v) for t, v in sorted(groups.items())}
    return metrics


def score(metrics: dict) -> float:
    if "acc" not in metrics:
        raise ValueError("the validation file has no human answers: VQA accuracy needs them")
    return metrics["acc"]
