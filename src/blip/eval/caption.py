"""Image captioning: beam-search captions scored with pycocoevalcap, as the official `train_caption.py`.

Captions come from `model.caption` with the official settings (beam 3, max_length 20 and min_length 5
counting the prompt). References and hypotheses are PTB-tokenised (Stanford CoreNLP, as COCOEvalCap)
and scored with BLEU-1..4, METEOR, ROUGE-L and CIDEr; SPICE too when its Stanford CoreNLP models are
installed (they are a separate download; this never fetches them). Values are fractions, as the
official logs print them (CIDEr 1.33 is the paper's 133.3).

Image ids (the results file's "image_id", and the key into a COCO-format gt file):
  1. the entry's "image_id" when every entry has one;
  2. else the number ending the image file's name, as the official `coco_karpathy_caption_eval`
     (`val2014/COCO_val2014_000000391895.jpg` -> 391895, `images/test/00000007.jpg` -> 7), when every
     name ends in one and no two images share it;
  3. else the image's position among the file's distinct images (0, 1, ...).
Entries with the same id are one image whose references add up (per-caption files work too).
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

RULE = "highest CIDEr + BLEU-4 on the validation set, as the official train_caption.py"
SCORERS = ("bleu", "meteor", "rouge", "cider", "spice")
RESULTS = "captions.json"
__all__ = ["RESULTS", "RULE", "SCORERS", "caption_metrics", "checked_annotation", "evaluate", "load_caption_annotation",
           "load_gt", "ptb_tokenize", "score"]

_PUNCTUATION = {"''", "'", "``", "`", "-LRB-", "-RRB-", "-LCB-", "-RCB-", ".", "?", "!", ",", ":", "-", "--",
                "...", ";"}  # the tokens COCOEvalCap's PTB tokenizer drops


# ------------------------------------------------------------------------------ annotations
def _read_json(path, what: str):
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FileNotFoundError(f"{what} not found: {path}") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not a JSON file: {e}") from None


def _file_number(image: str) -> int | None:
    m = re.search(r"(\d+)$", Path(image).stem)
    return int(m.group(1)) if m else None


def load_caption_annotation(data, image_root=None, need_captions: bool = True) -> list[dict]:
    """`[{"image", "caption": str or [refs], "image_id"?}]` (a file or the list) -> one dict per image
    {"image_id", "image" (resolved path), "refs" [str]} in first-seen order. Relative image paths resolve
    against image_root, else the file's folder. ValueError (naming the file) on another format."""
    name = str(data) if isinstance(data, (str, os.PathLike)) else "the annotation list"
    entries = _read_json(data, "annotation file") if isinstance(data, (str, os.PathLike)) else data
    root = Path(image_root) if image_root else (Path(data).parent if isinstance(data, (str, os.PathLike)) else Path())
    expected = 'captioning takes a JSON list of {"image": path, "caption": [references]}'
    if not isinstance(entries, list) or not entries:
        raise ValueError(f"{name}: {expected}, got {type(entries).__name__ if entries else 'an empty list'}")
    for k, e in enumerate(entries):
        if not isinstance(e, dict) or not isinstance(e.get("image"), str):
            raise ValueError(f"{name}: entry {k} has no \"image\" path; {expected}")
        caps = e.get("caption")
        caps = [caps] if isinstance(caps, str) else caps
        ok = isinstance(caps, list) and caps and all(isinstance(c, str) for c in caps)
        if need_captions and not ok:
            hint = " (this looks like a VQA file)" if "question" in e else ""
            raise ValueError(f"{name}: entry {k} has no \"caption\"{hint}; {expected}")
    paths = [e["image"] for e in entries]
    if all("image_id" in e for e in entries):
        ids = [e["image_id"] for e in entries]
    else:
        numbers = {p: _file_number(p) for p in paths}
        distinct = list(dict.fromkeys(paths))
        if None not in numbers.values() and len({numbers[p] for p in distinct}) == len(distinct):
            ids = [numbers[p] for p in paths]
        else:
            position = {p: i for i, p in enumerate(distinct)}
            ids = [position[p] for p in paths]
    images: dict = {}
    for e, image_id in zip(entries, ids):
        if isinstance(image_id, (list, dict)) or isinstance(image_id, bool):
            raise ValueError(f"{name}: image_id {image_id!r} is not a number or a string")
        item = images.setdefault(image_id, {"image_id": image_id, "image": str(root / e["image"]), "refs": []})
        caps = e.get("caption")
        item["refs"] += [caps] if isinstance(caps, str) else list(caps or [])
    return list(images.values())


def load_gt(path) -> dict:
    """A COCO-format caption file (`{"annotations": [{"image_id", "caption"}], "images": [...]}`, e.g.
    coco_karpathy_test_gt.json) -> {image_id: [references]}."""
    gt = _read_json(path, "gt file")
    anns = gt.get("annotations") if isinstance(gt, dict) else None
    if not isinstance(anns, list) or not all(isinstance(a, dict) and "image_id" in a and isinstance(a.get("caption"), str)
                                             for a in anns):
        raise ValueError(f"{path}: a gt file is COCO format: {{\"annotations\": [{{\"image_id\", \"caption\"}}], ...}}")
    refs: dict = {}
    for a in anns:
        refs.setdefault(a["image_id"], []).append(a["caption"])
    return refs


def _gt_for(gt, data):
    """gt may map data files (path or file name) to their gt files, for finetuning's val and test files."""
    if not isinstance(gt, dict):
        return gt
    if not isinstance(data, (str, os.PathLike)):
        return None
    return gt.get(str(data), gt.get(Path(data).name))


# ------------------------------------------------------------------------------ scoring
def _pycocoevalcap():
    try:
        from pycocoevalcap.tokenizer import ptbtokenizer
    except ImportError:
        raise RuntimeError("captioning metrics need pycocoevalcap: pip install pycocoevalcap") from None
    if shutil.which("java") is None:
        raise OSError("captioning metrics need Java (the PTB tokenizer and METEOR of pycocoevalcap): "
                      "install a Java runtime, e.g. apt-get install default-jre-headless")
    return Path(ptbtokenizer.__file__).parents[1]  # a namespace package: no __file__ of its own


def ptb_tokenize(texts: list[str]) -> list[str]:
    """COCOEvalCap's tokenisation: Stanford PTBTokenizer (lower-cased, one line per text), punctuation
    tokens dropped. Fed through stdin, so nothing is written inside the installed package."""
    jar = _pycocoevalcap() / "tokenizer" / "stanford-corenlp-3.4.1.jar"
    lines = [t.replace("\n", " ").replace("\r", " ") for t in texts]
    proc = subprocess.run(["java", "-cp", str(jar), "edu.stanford.nlp.process.PTBTokenizer", "-preserveLines",
                           "-lowerCase", "-encoding", "utf-8"], input="\n".join(lines).encode("utf-8"),
                          capture_output=True)
    out = proc.stdout.decode("utf-8").split("\n")
    if proc.returncode != 0 or len(out) < len(lines):
        err = proc.stderr.decode("utf-8", "replace").strip().splitlines()
        raise RuntimeError(f"the PTB tokenizer failed ({err[-1] if err else f'exit {proc.returncode}'})")
    return [" ".join(w for w in line.rstrip().split(" ") if w not in _PUNCTUATION) for line in out[:len(lines)]]


def _spice_missing(package: Path) -> str | None:
    lib = package / "spice" / "lib"
    if all((lib / f"stanford-corenlp-3.6.0{s}.jar").exists() for s in ("", "-models")):
        return None
    return ("skipped: its Stanford CoreNLP 3.6.0 models are not installed "
            "(python -m pycocoevalcap.spice.get_stanford_models downloads them)")


def caption_metrics(refs: dict, preds: dict, scorers=SCORERS) -> dict:
    """pycocoevalcap scores of preds {id: caption} against refs {id: [captions]} (the ids of preds),
    named as COCOEvalCap names them (Bleu_1..4, METEOR, ROUGE_L, CIDEr, SPICE)."""
    unknown = set(scorers) - set(SCORERS)
    if unknown:
        raise ValueError(f"unknown caption scorers {sorted(unknown)}; expected some of {', '.join(SCORERS)}")
    package = _pycocoevalcap()
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge
    ids = list(preds)
    flat = [r for i in ids for r in refs[i]] + [preds[i] for i in ids]
    tokens = iter(ptb_tokenize(flat))
    gts = {i: [next(tokens) for _ in refs[i]] for i in ids}
    res = {i: [next(tokens)] for i in ids}
    out: dict = {}
    with contextlib.redirect_stdout(io.StringIO()):  # BLEU prints its length statistics
        if "bleu" in scorers:
            bleu, _ = Bleu(4).compute_score(gts, res)
            out.update({f"Bleu_{n + 1}": float(b) for n, b in enumerate(bleu)})
        if "meteor" in scorers:
            from pycocoevalcap.meteor.meteor import Meteor
            meteor = Meteor()
            try:
                out["METEOR"] = float(meteor.compute_score(gts, res)[0])
            finally:
                del meteor  # its __del__ ends the Java process
        if "rouge" in scorers:
            out["ROUGE_L"] = float(Rouge().compute_score(gts, res)[0])
        if "cider" in scorers:
            out["CIDEr"] = float(Cider().compute_score(gts, res)[0])
        if "spice" in scorers:
            out["SPICE"] = _spice_missing(package) or _spice(gts, res)
    return out


def _spice(gts, res):
    from pycocoevalcap.spice.spice import Spice
    try:
        return float(Spice().compute_score(gts, res)[0])
    except (subprocess.CalledProcessError, OSError, ValueError) as e:  # SPICE 1.0 wants Java 8
        return f"skipped: SPICE failed ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"


def check_images_exist(data, images: list[dict], image_root=None) -> None:
    missing = next((im["image"] for im in images if not os.path.exists(im["image"])), None)
    if missing:
        where = f"image_root {image_root}" if image_root else "no image_root: relative to the file's folder"
        raise FileNotFoundError(f"{data}: image {missing} does not exist ({where})")


# ------------------------------------------------------------------------------ the protocol
def checked_annotation(data, image_root=None, gt=None) -> tuple[list[dict], dict]:
    """(images as load_caption_annotation gives them, references {image_id: [refs]}) after checking that
    every image exists and, with `gt`, has references there. Finetuning calls it before training."""
    gt = _gt_for(gt, data)
    images = load_caption_annotation(data, image_root, need_captions=gt is None)
    check_images_exist(data, images, image_root)
    if gt is None:
        return images, {im["image_id"]: im["refs"] for im in images}
    refs = load_gt(gt)
    absent = [im["image_id"] for im in images if im["image_id"] not in refs]
    if absent:
        raise ValueError(f"{gt} has no references for image_id {absent[0]!r} of {data} "
                         f"({len(absent)} of {len(images)} images; see blip.eval.caption for the id rule)")
    return images, refs


def evaluate(model, data, image_root=None, *, out_dir=None, progress=False, gt=None, num_beams: int = 3,
             max_length: int = 20, min_length: int = 5, prompt: str | None = None, batch_size: int = 32,
             scorers=SCORERS, repetition_penalty: float | None = None, length_normalization: str = "full",
             **unknown) -> dict:
    """Captions for the images of `data` (karpathy val/test format), scored against the data's own
    references, or against a COCO-format `gt` file (a path, or {data file or its name: gt path} for
    finetuning's val and test files). The results file `[{"image_id", "caption"}]` goes to
    out_dir/captions.json. prompt None: the model's (config.prompt, "a picture of ")."""
    if unknown:
        raise ValueError(f"options {sorted(unknown)} do not apply to captioning")
    images, refs = checked_annotation(data, image_root, gt)
    captions = model.caption([im["image"] for im in images], batch_size=batch_size, progress=progress,
                             prompt=prompt, num_beams=num_beams, max_length=max_length, min_length=min_length,
                             repetition_penalty=repetition_penalty, length_normalization=length_normalization)
    results = [{"image_id": im["image_id"], "caption": c} for im, c in zip(images, captions)]
    if out_dir is not None:
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        (Path(out_dir) / RESULTS).write_text(json.dumps(results) + "\n")
    metrics = caption_metrics(refs, {r["image_id"]: r["caption"] for r in results}, scorers)
    metrics["images"] = len(images)
    return metrics


def score(metrics: dict) -> float:
    return metrics["CIDEr"] + metrics["Bleu_4"]
