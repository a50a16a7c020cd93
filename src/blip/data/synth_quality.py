"""What a model has learnt of the synthetic corpus, scored against its scene ground truth (not n-grams).

Three probes on the test split (`metadata.json` holds every test scene):

1. ITM on one-attribute differences: for each test image, a true caption against the same sentence with
   one attribute changed (colour, shape, size, position or relation); ITM must prefer the true one.
2. Zero-shot retrieval: TR/IR@1/5 by ITC alone and with the official ITM rerank of the top k.
3. Captions: the greedy caption names the right colour-shape pair for the object of a one-object image,
   and for the large object of a two-object image whose objects differ in size.

Beside the first, the same pairs ranked by the decoder's log-likelihood of each caption (a diagnostic, not a
target: it tells whether the model holds an attribute that ITM does not read).

`probe(model, corpus)` returns them as one dict; `benchmarks/synthetic_quality.py` is its command line.
"""
from __future__ import annotations

import copy
import json
import math
import re
from pathlib import Path

import numpy as np
import torch

from .synth import ANCHORS, COLORS, SHAPES, caption_variants

ATTRIBUTES = ("color", "shape", "size", "position", "relation")
TARGETS = {"itm_attribute_accuracy": 90.0, "caption_single": 80.0, "caption_two_larger": 60.0}


def _mutated(scene: dict, attr: str, i: int):
    """The scene with attribute `attr` of object i changed, or None when it cannot change."""
    s = copy.deepcopy(scene)
    objs = s["objects"]
    o = objs[i]
    if attr == "color":
        o["color"] = next(c for c in COLORS if c not in {x["color"] for x in objs})
    elif attr == "shape":
        o["shape"] = next(c for c in SHAPES if c not in {x["shape"] for x in objs})
    elif attr == "size":
        o["size"] = "small" if o["size"] == "large" else "large"
    elif attr == "position":
        free = [p for p in ANCHORS if p not in {x["position"] for x in objs}]
        if not free:
            return None
        o["position"] = free[0]
    elif attr == "relation":
        if i or not s["relations"]:
            return None
        s["relations"] = [[b, r, a] for a, r, b in s["relations"]]
    return s


def attribute_pairs(scene: dict, seed: int) -> list[tuple[str, str, str]]:
    """(true caption, the same caption with one attribute changed, attribute) for each attribute that some
    template shows: the first template (in a seeded order) and object where the change is visible."""
    variants = caption_variants(scene, seed)
    order = np.random.default_rng(seed).permutation(len(variants))
    out = []
    for attr in ATTRIBUTES:
        found = None
        for t in order:
            for i in range(len(scene["objects"])):
                s = _mutated(scene, attr, i)
                if s is None:
                    continue
                false = caption_variants(s, seed)[t]
                if false != variants[t] and not (attr == "relation" and "next to" in false):
                    found = (variants[t], false, attr)
                    break
            if found:
                break
        if found:
            out.append(found)
    return out


_BINDING = re.compile(r"\b(" + "|".join(COLORS) + r")\s+(" + "|".join(SHAPES) + r")\b")
_BINDING_AFTER = re.compile(r"\b(" + "|".join(SHAPES) + r")\s+colou?red\s+(" + "|".join(COLORS) + r")\b")
_WORD = re.compile(r"[a-z]+")


def bindings(caption: str) -> set[tuple[str, str]]:
    """(colour, shape) pairs a caption states: "a red circle", "a large red circle", "a circle colored red"."""
    text = caption.lower()
    return {(c, s) for c, s in _BINDING.findall(text)} | {(c, s) for s, c in _BINDING_AFTER.findall(text)}


def caption_correct(caption: str, scene: dict) -> dict:
    """Whether the caption names the right colour and shape of the object that counts: the only one of a
    one-object scene, the large one of a two-object scene whose sizes differ (None: not scored).
    `strict` also asks that it names no colour or shape absent from the scene."""
    objs = scene["objects"]
    if len(objs) == 1:
        target = objs[0]
    elif len(objs) == 2 and objs[0]["size"] != objs[1]["size"]:
        target = next(o for o in objs if o["size"] == "large")
    else:
        return {"scored": None}
    named = (target["color"], target["shape"]) in bindings(caption)
    words = set(_WORD.findall(caption.lower()))
    foreign = (words & set(COLORS)) - {o["color"] for o in objs} or (words & set(SHAPES)) - {o["shape"] for o in objs}
    return {"scored": "single" if len(objs) == 1 else "two_larger", "correct": named, "strict": named and not foreign,
            "target": f"{target['size']} {target['color']} {target['shape']}"}


def _load_corpus(corpus: str | Path) -> tuple[Path, list[dict]]:
    corpus = Path(corpus)
    meta = corpus / "metadata.json"
    if not meta.exists():
        raise FileNotFoundError(f"{meta} not found: give the folder `blip data synth` wrote")
    return corpus, json.loads(meta.read_text())["test"]


def _attribute_tests(tests, limit: int | None):
    """(test item, its one-attribute pairs, their texts true-then-changed) for each test scene that has pairs."""
    for k, t in enumerate(tests[:limit]):
        pairs = attribute_pairs(t["scene"], seed=10007 * (k + 1))
        if pairs:
            yield t, pairs, [x for true, false, _ in pairs for x in (true, false)]


@torch.inference_mode()
def itm_attributes(model, corpus, tests, limit: int | None = None) -> dict:
    """ITM accuracy (and its mean binary cross-entropy) on true vs one-attribute-changed captions."""
    right: dict[str, list[bool]] = {a: [] for a in ATTRIBUTES}
    nll = []
    for t, pairs, texts in _attribute_tests(tests, limit):
        p = model.match(str(corpus / t["image"]), texts)["itm"].double().clamp(1e-6, 1 - 1e-6)
        for j, (_, _, attr) in enumerate(pairs):
            right[attr].append(bool(p[2 * j] > p[2 * j + 1]))
            nll += [-math.log(p[2 * j]), -math.log(1 - p[2 * j + 1])]
    every = [x for v in right.values() for x in v]
    return {"itm_attribute_accuracy": 100.0 * sum(every) / max(len(every), 1),
            "itm_by_attribute": {a: round(100.0 * sum(v) / len(v), 1) for a, v in right.items() if v},
            "itm_pairs": len(every), "itm_bce": sum(nll) / max(len(nll), 1), "itm_bce_prior": math.log(2)}


@torch.inference_mode()
def decoder_attributes(model, corpus, tests, limit: int | None = None) -> dict:
    """The one-attribute pairs of itm_attributes ranked by the decoder: the true caption must get the higher
    log-likelihood ([DEC] first, no prompt, as the pretraining LM loss reads a caption)."""
    from ..tokenizer import DEC_ID
    right: dict[str, list[bool]] = {a: [] for a in ATTRIBUTES}
    dec = model.text_decoder
    for t, pairs, texts in _attribute_tests(tests, limit):
        ids, mask = model._texts(texts, 35, DEC_ID)
        states = model.encode_image(str(corpus / t["image"])).expand(ids.shape[0], -1, -1)
        logits = dec.cls(dec.bert(ids, mask, states, mode="causal")).float()
        ll = (logits[:, :-1].log_softmax(-1).gather(-1, ids[:, 1:, None])[..., 0] * mask[:, 1:]).sum(1)
        for j, (_, _, attr) in enumerate(pairs):
            right[attr].append(bool(ll[2 * j] > ll[2 * j + 1]))
    every = [x for v in right.values() for x in v]
    return {"lm_attribute_accuracy": 100.0 * sum(every) / max(len(every), 1),
            "lm_by_attribute": {a: round(100.0 * sum(v) / len(v), 1) for a, v in right.items() if v}}


def caption_attributes(model, corpus, tests, limit: int | None = None, batch_size: int = 32) -> dict:
    scored = [t for t in tests[:limit] if caption_correct("", t["scene"])["scored"]]
    caps = model.caption([str(corpus / t["image"]) for t in scored], num_beams=1, max_length=30, min_length=5,
                         batch_size=batch_size)
    result: dict[str, list] = {"single": [], "two_larger": []}
    examples = []
    for t, cap in zip(scored, caps):
        c = caption_correct(cap, t["scene"])
        result[c["scored"]].append(c)
        if len(examples) < 6:
            examples.append({"image": t["image"], "caption": cap, "correct": c["correct"], "truth": c["target"]})

    def rate(items, key):
        return 100.0 * sum(c[key] for c in items) / len(items) if items else float("nan")
    return {"caption_single": rate(result["single"], "correct"), "caption_two_larger": rate(result["two_larger"], "correct"),
            "caption_single_strict": rate(result["single"], "strict"),
            "caption_two_larger_strict": rate(result["two_larger"], "strict"),
            "caption_counts": {k: len(v) for k, v in result.items()}, "caption_examples": examples}


def probe(model, corpus: str | Path, k_test: int = 16, limit: int | None = None) -> dict:
    """Every probe the model's parts allow (ITM and retrieval need a text encoder and heads, captions a
    decoder) on the corpus's test split."""
    from ..evaluate import evaluate_retrieval
    corpus, tests = _load_corpus(corpus)
    out: dict = {"corpus": str(corpus), "test_images": len(tests[:limit])}
    if model.has("text_encoder", "itm_head"):
        out.update(itm_attributes(model, corpus, tests, limit))
        out["retrieval_itc"] = _rounded(evaluate_retrieval(model, corpus / "test.json", k_test=0))
        if k_test:
            out["retrieval_itm"] = _rounded(evaluate_retrieval(model, corpus / "test.json", k_test=k_test))
    if model.has("text_decoder") and model.config.task != "vqa":
        out.update(decoder_attributes(model, corpus, tests, limit))
        out.update(caption_attributes(model, corpus, tests, limit))
    return out


def _rounded(d: dict) -> dict:
    return {k: round(v, 2) for k, v in d.items()}
