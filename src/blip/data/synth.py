"""
A deterministic synthetic "web corpus": rendered scenes of coloured shapes, with captions.

Why: pretraining and finetuning must run (and be checked) on a laptop, without downloading
LAION or COCO. Every caption is generated from a scene graph that is written out too, so tests
and evaluations know the truth: which web captions are noise, what colour an object really is,
the answer to every VQA question.

Read top to bottom:
  1. vocabulary: shapes, colours, backgrounds, positions, web-noise texts
  2. scenes: sample a scene graph, render it with Pillow
  3. language: captions from a scene (several templates), web noise, VQA pairs and their simulated
     annotators, NLVR2-style statements about two scenes
  4. writers: JPEG / JSON / tar, all byte-deterministic
  5. generate_corpus
  6. command line: `blip data synth` (add_cli) and `python -m blip.data.synth`

Files, in the official BLIP formats (image paths are relative to the corpus folder):
  pretrain.json          [{"image", "caption"}]                      noisy web pairs (and shards/*.tar)
  clean_train.json       [{"image", "caption", "image_id"}]          one entry per caption
  val.json, test.json    [{"image", "caption": [refs]}]              Karpathy val/test style
  val_gt.json, test_gt.json  COCO captions: {"images": [{"id"}], "annotations": [{"image_id", "caption", "id"}]}
  vqa_{train,val,test}.json  [{"question_id", "image", "question", "answer": [10 annotators], "dataset": "vqa",
                              "question_type", "answer_type"}]  (test keeps its answers, to be scored here)
  vqa_train_web.json     the same kind of questions about the web images (pretrain.json's), ids after val's
  answer_list.json       every canonical VQA answer
  nlvr_{train,dev,test}.json [{"images": [left, right], "sentence", "label": "True" | "False"}]
  metadata.json          the truth: scenes, noise labels, canonical answers, NLVR claims and evidence
Caption evaluation: entry i of val.json / test.json is image "id" i of val_gt.json / test_gt.json,
and its file is images/<split>/<i:08d>.jpg, so the official rule (the digits of the file name) gives
the same id. clean_train "image_id" is "synth_<i>" for images/clean/<i:08d>.jpg.

Randomness: every image draws from its own numpy Generator seeded by (seed, split, index), so a
seed reproduces the corpus byte for byte, and one image does not depend on how many came before.
The val split and everything derived from VQA annotators and NLVR draw from their own seeds, so
the files of the other splits do not depend on them.
"""
from __future__ import annotations

import argparse
import copy
import functools
import io
import json
import shutil
import sys
import tarfile
import time
from itertools import combinations
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

# -----------------------------------------------------------------------------
# vocabulary

SHAPES = ("circle", "square", "triangle", "star", "diamond", "hexagon", "cross")

# object colours, far enough apart that the pixel at an object's centre names its colour
COLORS = {
    "red": (220, 40, 40), "green": (40, 160, 60), "blue": (40, 80, 220), "yellow": (240, 210, 40),
    "orange": (245, 135, 30), "purple": (130, 60, 180), "pink": (245, 140, 200), "white": (250, 250, 250),
    "black": (25, 25, 25), "brown": (125, 80, 40), "cyan": (50, 200, 215),
}
# background colours: other names than the object colours, so a colour word in a caption is unambiguous
BACKGROUND_COLORS = {
    "gray": (150, 150, 150), "beige": (225, 210, 170), "navy": (25, 35, 90), "olive": (110, 110, 50),
    "teal": (30, 110, 110), "lavender": (200, 190, 230),
}
BACKGROUND_KINDS = ("solid", "gradient", "noise", "stripes")
MIN_CONTRAST = 110  # least RGB distance between an object colour and any background colour behind it

SIZES = {"small": 0.07, "large": 0.13}  # object radius as a fraction of the image side
# anchor centres (fractions of the side); adjacent anchors are 0.3 apart, more than two large radii
ANCHORS = {"left": (0.2, 0.5), "right": (0.8, 0.5), "top": (0.5, 0.2), "bottom": (0.5, 0.8), "center": (0.5, 0.5)}
JITTER = 0.015
POSITION_PHRASES = {"left": "on the left", "right": "on the right", "top": "at the top",
                    "bottom": "at the bottom", "center": "in the center"}
# relations are stored as "left of" / "above" (a is left of / above b); captions may state them either way round
INVERSE = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}
RELATION_PHRASES = {"left of": ("to the left of", "left of", "next to"),
                    "right of": ("to the right of", "right of", "next to"),
                    "above": ("above", "over"), "below": ("below", "under", "beneath")}

# groups for WordSwap ITM negatives (itm_swap_words="synthetic"): one attribute for another, as the captions
# phrase it ("on the left" -> "at the top", never "on the top") and never a synonym ("under" -> "beneath")
SWAP_GROUPS = (tuple(COLORS), SHAPES, tuple(SIZES), tuple(POSITION_PHRASES.values()),
               ("to the left of", "to the right of"), ("left of", "right of"),
               (("above", "over"), ("below", "under", "beneath")))

NOISE_KINDS = ("swapped", "wrong_attribute", "boilerplate", "short")
BOILERPLATE = ("image", "click here to enlarge", "stock photo {n}", "IMG_{n4}.jpg", "DSC{n5}.JPG", "untitled",
               "view larger image", "thumbnail", "download free image {n}", "photo {n4}",
               "image may contain: {n} people")
SHORT = ("nice", "my photo", "cool", "wow", "look at this", "awesome pic", "love it", "new", "random stuff",
         "today", "so pretty", "art")

SPLIT_CODES = {"train": 1, "clean": 2, "test": 3, "val": 4}  # mixed into the per-image seeds; append only


def _pick(rng, seq):
    return seq[int(rng.integers(len(seq)))]


def _sample(rng, seq, k):
    """k distinct elements of seq, in random order."""
    return [seq[int(i)] for i in rng.permutation(len(seq))[:k]]


def _distance(a, b):
    return float(np.sqrt(sum((x - y) ** 2 for x, y in zip(a, b))))


# -----------------------------------------------------------------------------
# scenes

@functools.lru_cache(maxsize=None)
def _contrasting_colors(bg_colors: tuple[str, ...]) -> list[str]:
    """Object colours that stand out from every one of these background colours."""
    return [c for c in COLORS if min(_distance(COLORS[c], BACKGROUND_COLORS[b]) for b in bg_colors) > MIN_CONTRAST]


def sample_scene(rng, image_size: int) -> dict:
    """A scene graph: background, 1-3 objects (distinct shapes and colours), relations.

    Shapes and colours are distinct within a scene, so "the circle" or "the red object" always
    names exactly one object. Relations hold between objects on the same row (left/center/right)
    or column (top/center/bottom); diagonal pairs get none.
    """
    kind = _pick(rng, BACKGROUND_KINDS)
    bg_colors = _sample(rng, list(BACKGROUND_COLORS), 1 if kind in ("solid", "noise") else 2)
    background = {"kind": kind, "colors": bg_colors}
    if kind == "gradient":
        background["direction"] = _pick(rng, ("horizontal", "vertical"))
    elif kind == "stripes":
        background["direction"] = _pick(rng, ("horizontal", "vertical", "diagonal"))
        background["period"] = int(rng.integers(image_size // 8, image_size // 4 + 1))
    elif kind == "noise":
        background["seed"] = int(rng.integers(2**31))

    allowed = _contrasting_colors(tuple(bg_colors))
    n = int(rng.choice([1, 2, 3], p=[0.3, 0.4, 0.3]))
    positions = _sample(rng, list(ANCHORS), n)
    shapes = _sample(rng, SHAPES, n)
    colors = _sample(rng, allowed, n)
    objects = []
    for position, shape, color in zip(positions, shapes, colors):
        size = _pick(rng, tuple(SIZES))
        ax, ay = ANCHORS[position]
        x = int(round((ax + rng.uniform(-JITTER, JITTER)) * image_size))
        y = int(round((ay + rng.uniform(-JITTER, JITTER)) * image_size))
        objects.append({"shape": shape, "color": color, "size": size, "position": position,
                        "x": x, "y": y, "r": max(2, int(round(SIZES[size] * image_size)))})

    relations = []
    row, column = {"left", "center", "right"}, {"top", "center", "bottom"}
    for i, j in combinations(range(n), 2):
        pair = {objects[i]["position"], objects[j]["position"]}
        if pair <= row:
            a, b = (i, j) if objects[i]["x"] < objects[j]["x"] else (j, i)
            relations.append([a, "left of", b])
        elif pair <= column:
            a, b = (i, j) if objects[i]["y"] < objects[j]["y"] else (j, i)
            relations.append([a, "above", b])
    return {"background": background, "objects": objects, "relations": relations}


def _background(bg: dict, size: int) -> Image.Image:
    """The background as a (size x size) RGB image."""
    c = np.array([BACKGROUND_COLORS[name] for name in bg["colors"]], dtype=np.float32)
    kind = bg["kind"]
    if kind == "solid":
        return Image.new("RGB", (size, size), BACKGROUND_COLORS[bg["colors"][0]])
    if kind == "noise":  # luminance noise around one colour
        rng = np.random.default_rng(bg["seed"])
        a = c[0] + 18.0 * rng.standard_normal((size, size, 1), dtype=np.float32)
        a = np.rint(a).clip(0, 255).astype(np.uint8)
    elif kind == "gradient":  # "horizontal" runs left to right
        t = np.linspace(0.0, 1.0, size, dtype=np.float32)[:, None]
        line = np.rint(c[0] * (1 - t) + c[1] * t).astype(np.uint8)  # (size, 3)
        a = np.broadcast_to(line[None, :, :] if bg["direction"] == "horizontal" else line[:, None, :], (size, size, 3))
    else:
        u = np.arange(size)
        u = {"horizontal": u[:, None], "vertical": u[None, :], "diagonal": u[:, None] + u[None, :]}[bg["direction"]]
        band = np.broadcast_to((u // max(bg["period"] // 2, 1)) % 2, (size, size))
        a = c.astype(np.uint8)[band]
    return Image.fromarray(np.ascontiguousarray(a), mode="RGB")


def _polygon(x, y, radii, start_deg):
    step = 360.0 / len(radii)
    return [(x + r * np.cos(np.radians(start_deg + k * step)), y + r * np.sin(np.radians(start_deg + k * step)))
            for k, r in enumerate(radii)]


def _draw_shape(draw, shape, x, y, r, fill):
    if shape == "circle":
        draw.ellipse([x - r, y - r, x + r, y + r], fill=fill)
    elif shape == "square":
        h = 0.85 * r
        draw.rectangle([x - h, y - h, x + h, y + h], fill=fill)
    elif shape == "triangle":
        draw.polygon(_polygon(x, y, [r] * 3, -90), fill=fill)
    elif shape == "star":
        draw.polygon(_polygon(x, y, [r, 0.45 * r] * 5, -90), fill=fill)
    elif shape == "diamond":
        draw.polygon([(x, y - r), (x + 0.75 * r, y), (x, y + r), (x - 0.75 * r, y)], fill=fill)
    elif shape == "hexagon":
        draw.polygon(_polygon(x, y, [r] * 6, 0), fill=fill)
    elif shape == "cross":
        w = 0.33 * r
        draw.rectangle([x - r, y - w, x + r, y + w], fill=fill)
        draw.rectangle([x - w, y - r, x + w, y + r], fill=fill)
    else:
        raise ValueError(f"unknown shape {shape!r}")


def render_scene(scene: dict, image_size: int) -> Image.Image:
    """The scene as an RGB image. Pure: the same scene always gives the same pixels."""
    img = _background(scene["background"], image_size)
    draw = ImageDraw.Draw(img)
    for o in scene["objects"]:
        _draw_shape(draw, o["shape"], o["x"], o["y"], o["r"], COLORS[o["color"]])
    return img


# -----------------------------------------------------------------------------
# language

def _article(phrase: str) -> str:
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def _noun(o: dict, with_size: bool) -> str:
    return _article(f"{o['size']} {o['color']} {o['shape']}" if with_size else f"{o['color']} {o['shape']}")


def _background_phrase(bg: dict, rng) -> str:
    c = bg["colors"]
    if bg["kind"] == "solid":
        return f"a {c[0]} background"
    if bg["kind"] == "noise":
        return f"a {_pick(rng, ('noisy', 'textured'))} {c[0]} background"
    if bg["kind"] == "gradient":
        return _pick(rng, (f"a {c[0]} and {c[1]} gradient", "a gradient background"))
    return _pick(rng, (f"{c[0]} and {c[1]} stripes", "a striped background"))


def caption_variants(scene: dict, seed: int) -> list[str]:
    """Every caption template rendered once for the scene (at least 6, all true and distinct).

    The random choices (which sizes are mentioned, relation wording, object order) come from
    `seed`, and how many are drawn depends only on the scene's structure (object count, relation
    count, background kind). So a scene with one attribute changed, rendered with the same seed
    and template index, gives the same sentence pattern with that attribute changed: that is how
    `wrong_attribute` noise is made.
    """
    rng = np.random.default_rng(seed)
    objs, rels = scene["objects"], scene["relations"]
    n = len(objs)

    def noun(i):  # the size is mentioned half the time
        return _noun(objs[i], bool(rng.random() < 0.5))

    def on_bg():
        return "on " + _background_phrase(scene["background"], rng)

    def where(i):
        return f"{noun(i)} {POSITION_PHRASES[objs[i]['position']]}"

    def listing():
        names = [noun(int(i)) for i in rng.permutation(n)]
        return names[0] if n == 1 else ", ".join(names[:-1]) + " and " + names[-1]

    def relation():  # (a, phrase, b, the remaining object or None)
        a, r, b = rels[int(rng.integers(len(rels)))]
        if rng.random() < 0.5:
            a, b, r = b, a, INVERSE[r]
        rest = [i for i in range(n) if i not in (a, b)]
        return noun(a), _pick(rng, RELATION_PHRASES[r]), noun(b), (rest[0] if rest else None)

    o = objs[0]
    if n == 1:
        out = [f"{noun(0)} {on_bg()}", f"a picture of {noun(0)} {on_bg()}", where(0), f"an image of {noun(0)}",
               f"a photo of a single {o['color']} {o['shape']}", f"there is {where(0)} of the picture",
               f"{_article(o['shape'])} colored {o['color']}", f"a simple drawing of {noun(0)} {on_bg()}"]
    else:
        count = "two" if n == 2 else "three"
        out = [listing(), f"{count} shapes: {listing()}", f"{listing()} {on_bg()}",
               f"a picture of {count} objects: {listing()}",
               ", ".join(where(i) for i in range(n - 1)) + f" and {where(n - 1)}",
               f"an image with {listing()} {on_bg()}"]
    if n >= 2 and rels:
        for form in range(3):
            a, r, b, c = relation()
            tail = "" if c is None else (f" and {noun(c)}" if form != 2 else f", with {where(c)}")
            out.append([f"{a} {r} {b}{tail}", f"a picture of {a} {r} {b}{tail} {on_bg()}",
                        f"an image showing {a} {r} {b}{tail}"][form])
    return out


def _mutate(scene: dict, template: int, cap_seed: int, clean: str, rng):
    """A caption with one attribute of the scene changed: (caption, attribute).

    Tries a change of colour, shape, size and relation, and picks one of those that show in the
    sentence (a size change is invisible when the template does not mention sizes, a relation
    change when it names no relation or says "next to"), favouring the relation, which few
    templates show. A colour change always shows: every template names every object's colour.
    """
    n = len(scene["objects"])
    used_colors = {o["color"] for o in scene["objects"]}
    used_shapes = {o["shape"] for o in scene["objects"]}
    attributes = ["color", "shape", "size"] + (["relation"] if scene["relations"] else [])
    visible = []
    for attr in attributes:
        s = copy.deepcopy(scene)
        o = s["objects"][int(rng.integers(n))]
        if attr == "color":
            o["color"] = _pick(rng, [c for c in COLORS if c not in used_colors])
        elif attr == "shape":
            o["shape"] = _pick(rng, [c for c in SHAPES if c not in used_shapes])
        elif attr == "size":
            o["size"] = "small" if o["size"] == "large" else "large"
        else:
            s["relations"] = [[b, r, a] for a, r, b in s["relations"]]
        caption = caption_variants(s, cap_seed)[template]
        if caption != clean and not (attr == "relation" and "next to" in caption):
            visible.append((caption, attr))
    weights = np.array([3.0 if attr == "relation" else 1.0 for _, attr in visible])  # relations are rarely visible
    return visible[int(rng.choice(len(visible), p=weights / weights.sum()))]


def _boilerplate(rng) -> str:
    n = int(rng.integers(1, 100000))
    return _pick(rng, BOILERPLATE).format(n=n, n4=f"{n % 10000:04d}", n5=f"{n:05d}")


def _webify(caption: str, rng) -> str:
    """Web alt-text style: sometimes capitalised, sometimes with a full stop (pre_caption undoes both)."""
    if rng.random() < 0.3:
        caption = caption[0].upper() + caption[1:]
    if rng.random() < 0.3:
        caption += "."
    return caption


def vqa_pairs(scene: dict, rng, k: int) -> list[tuple[str, str, str]]:
    """Up to k (question, answer, question type) triples, drawn round-robin over types so types vary."""
    objs, rels, bg = scene["objects"], scene["relations"], scene["background"]
    shapes = [o["shape"] for o in objs]
    colors = [o["color"] for o in objs]
    absent_shape = _pick(rng, [s for s in SHAPES if s not in shapes])
    absent_color = _pick(rng, [c for c in COLORS if c not in colors])
    groups = {
        "color": [(f"what color is the {o['shape']}?", o["color"]) for o in objs],
        "shape": [(f"what shape is the {o['color']} object?", o["shape"]) for o in objs],
        "count": [("how many objects are there?", str(len(objs)))],
        "exists": [(f"is there a {_pick(rng, shapes)}?", "yes"), (f"is there a {absent_shape}?", "no"),
                   (f"is there {_article(_pick(rng, colors))} object?", "yes"),
                   (f"is there {_article(absent_color)} object?", "no")],
        "size": [(f"is the {o['shape']} small or large?", o["size"]) for o in objs],
        "position": [(f"where is the {o['color']} {o['shape']}?", o["position"]) for o in objs],
        "relation": [],
    }
    if bg["kind"] == "solid":
        groups["background"] = [("what color is the background?", bg["colors"][0])]
    facts = [(a, r, b) for a, r, b in rels] + [(b, INVERSE[r], a) for a, r, b in rels]
    for subj, word, ref in facts:  # ask only when exactly one object stands in that relation to ref
        if sum(1 for _, w, y in facts if w == word and y == ref) == 1:
            o = objs[ref]
            groups["relation"].append((f"what shape is {word} the {o['color']} {o['shape']}?", objs[subj]["shape"]))
    types = [t for t in groups if groups[t]]
    for t in types:
        groups[t] = _sample(rng, groups[t], len(groups[t]))
    types = _sample(rng, types, len(types))
    out = []
    while len(out) < k and any(groups[t] for t in types):
        for t in types:
            if groups[t] and len(out) < k:
                out.append((*groups[t].pop(), t))
    return out


# VQA annotators. Official VQA has 10 human answers per question, scored min(#matching / 3, 1) averaged
# over the 10 leave-one-out subsets, after a normalisation (lower case, full stop and articles dropped,
# number words to digits). Simulated here: every annotator means the canonical answer except at most
# two, and up to six spell it otherwise ("two" for "2", "Red", "red."). So the canonical answer always
# scores 100% after normalisation but not always without it, and a wrong answer one annotator gave
# earns 0.3: a scorer that skips either rule is caught.
N_ANNOTATORS = 10
NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six")
ANSWER_TYPES = {"count": "number", "exists": "yes/no"}  # every other question type is "other"


def _answer_pool(qtype: str) -> tuple[str, ...]:
    """Every answer a question of this type can have: where the wrong annotator answers come from."""
    return {"color": tuple(COLORS), "background": tuple(BACKGROUND_COLORS), "shape": SHAPES, "relation": SHAPES,
            "count": ("1", "2", "3", "4"), "exists": ("yes", "no"), "size": tuple(SIZES),
            "position": tuple(ANCHORS)}[qtype]


def answer_spellings(answer: str, qtype: str) -> list[str]:
    """Other spellings of answer that the official VQA normalisation maps back to it."""
    out = [answer.capitalize(), answer + ".", answer.upper()]
    if qtype == "count":
        out.append(NUMBER_WORDS[int(answer)])
    elif qtype in ("shape", "relation"):
        out.append(_article(answer))
    elif qtype == "position":
        out.append("the " + answer)
    return out


def annotator_answers(answer: str, qtype: str, rng) -> list[str]:
    """N_ANNOTATORS answers: 0-2 wrong, 0-6 other spellings of answer, the rest answer itself."""
    n_wrong = int(rng.choice(3, p=[0.7, 0.2, 0.1]))
    n_spelled = int(rng.choice(7, p=[0.25, 0.2, 0.15, 0.12, 0.1, 0.1, 0.08]))
    spellings = answer_spellings(answer, qtype)
    wrong = [a for a in _answer_pool(qtype) if a != answer]
    answers = ([answer] * (N_ANNOTATORS - n_wrong - n_spelled) + [_pick(rng, spellings) for _ in range(n_spelled)]
               + [_pick(rng, wrong) for _ in range(n_wrong)])
    return _sample(rng, answers, N_ANNOTATORS)


# NLVR2-style statements about a pair of images (left = images[0], right = images[1]). The official
# training swaps the two images half the time and then swaps the words "left" and "right" when the
# sentence has them, and only the images when it has not. So a statement says "left"/"right" only of
# the images, never of an object's position, and one without those words is symmetric in the images.
# Each claim is a small dict (kind and parameters) that nlvr_fact judges against the two scenes.

def _count_phrase(n: int) -> str:
    return f"{NUMBER_WORDS[n]} shape" + ("" if n == 1 else "s")


def nlvr_sentence(claim: dict) -> str:
    k, side = claim["kind"], claim.get("side")
    if k == "total":
        text = f"there are {_count_phrase(claim['n'])} in total"
    elif k == "both_count":
        text = f"both images contain exactly {_count_phrase(claim['n'])}"
    elif k == "more":
        text = f"the {side} image has more shapes than the {'right' if side == 'left' else 'left'} image"
    elif k == "same_count":
        text = "both images have the same number of shapes"
    elif k == "both_color":
        text = f"both images contain {_article(claim['color'])} shape"
    elif k == "both_shape":
        text = f"both images contain {_article(claim['shape'])}"
    elif k == "one_color":
        text = f"exactly one image contains {_article(claim['color'])} shape"
    elif k == "side_object":
        text = f"the {side} image contains {_article(claim['color'] + ' ' + claim['shape'])}"
    elif k == "side_count":
        text = f"the {side} image contains exactly {_count_phrase(claim['n'])}"
    elif k == "side_size":
        text = f"there is {_article(claim['size'] + ' ' + claim['shape'])} in the {side} image"
    else:
        raise ValueError(f"unknown NLVR claim kind {k!r}")
    return text[0].upper() + text[1:] + "."


def nlvr_fact(claim: dict, left: dict, right: dict) -> tuple[bool, dict]:
    """(is the claim true of these scenes, the facts it rests on)."""
    scenes = {"left": left, "right": right}
    counts = {s: len(scenes[s]["objects"]) for s in scenes}
    k = claim["kind"]
    if k in ("total", "both_count", "more", "same_count"):
        truth = {"total": lambda: counts["left"] + counts["right"] == claim["n"],
                 "both_count": lambda: counts["left"] == counts["right"] == claim["n"],
                 "more": lambda: counts[claim["side"]] > counts["right" if claim["side"] == "left" else "left"],
                 "same_count": lambda: counts["left"] == counts["right"]}[k]()
        return truth, {"counts": counts}
    if k in ("both_color", "one_color"):
        has = {s: any(o["color"] == claim["color"] for o in scenes[s]["objects"]) for s in scenes}
        return (all(has.values()) if k == "both_color" else sum(has.values()) == 1), {"contains": has}
    if k == "both_shape":
        has = {s: any(o["shape"] == claim["shape"] for o in scenes[s]["objects"]) for s in scenes}
        return all(has.values()), {"contains": has}
    objects = scenes[claim["side"]]["objects"]
    evidence = {"objects": [f"{o['size']} {o['color']} {o['shape']}" for o in objects]}
    if k == "side_object":
        return any(o["color"] == claim["color"] and o["shape"] == claim["shape"] for o in objects), evidence
    if k == "side_count":
        return len(objects) == claim["n"], evidence
    if k == "side_size":
        return any(o["size"] == claim["size"] and o["shape"] == claim["shape"] for o in objects), evidence
    raise ValueError(f"unknown NLVR claim kind {k!r}")


def _nlvr_claims(left: dict, right: dict) -> dict[str, list[dict]]:
    """Every claim considered for a pair, by kind. False claims are near misses: colours and shapes
    of the two scenes (true of one image, or a real colour on another shape), counts off by one."""
    objs = left["objects"] + right["objects"]
    colors = sorted({o["color"] for o in objs})
    shapes = sorted({o["shape"] for o in objs})
    sides = ("left", "right")
    near = {"left": len(left["objects"]), "right": len(right["objects"])}
    return {
        "total": [{"kind": "total", "n": n} for n in range(len(objs) - 1, len(objs) + 2) if 2 <= n <= 6],
        "both_count": [{"kind": "both_count", "n": n} for n in (1, 2, 3)],
        "more": [{"kind": "more", "side": s} for s in sides],
        "same_count": [{"kind": "same_count"}],
        "both_color": [{"kind": "both_color", "color": c} for c in colors],
        "both_shape": [{"kind": "both_shape", "shape": s} for s in shapes],
        "one_color": [{"kind": "one_color", "color": c} for c in colors],
        "side_object": [{"kind": "side_object", "side": side, "color": c, "shape": s}
                        for side in sides for c in colors for s in shapes],
        "side_count": [{"kind": "side_count", "side": s, "n": n} for s in sides for n in (1, 2, 3)
                       if abs(n - near[s]) <= 1],
        "side_size": [{"kind": "side_size", "side": side, "size": z, "shape": s}
                      for side in sides for z in SIZES for s in shapes],
    }


def nlvr_statements_for(left: dict, right: dict, labels: list[bool], rng) -> list[tuple[dict, bool, dict]]:
    """One distinct (claim, truth, evidence) per wanted label. The kind is drawn among those that can
    be both true and false of this pair, so the label does not follow from the kind of sentence (a
    text-only model stays near chance); then a claim of that kind with the wanted label."""
    judged = {kind: [(c, *nlvr_fact(c, left, right)) for c in claims]
              for kind, claims in _nlvr_claims(left, right).items()}
    out = []
    for want in labels:
        def offers(k, label):
            return any(t == label for _, t, _ in judged[k])
        kinds = [k for k in judged if offers(k, True) and offers(k, False)] or [k for k in judged if offers(k, want)]
        if not kinds:
            continue
        kind = _pick(rng, kinds)
        options = [x for x in judged[kind] if x[1] == want]
        chosen = _pick(rng, options)
        judged[kind].remove(chosen)  # each claim (so each sentence) once per pair
        out.append(chosen)
    return out


# -----------------------------------------------------------------------------
# writers (byte-deterministic: fixed encoder options, no timestamps)

def encode_jpeg(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=90, subsampling="4:2:0", optimize=False, progressive=False)
    return buf.getvalue()


def write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, ensure_ascii=False, separators=(",", ":")) + "\n", encoding="utf-8")


def write_tar(path: Path, members: list[tuple[str, bytes]]) -> None:
    """A tar with sorted member names, mtime 0, uid/gid 0: the same members give the same bytes."""
    with open(path, "wb") as f, tarfile.open(fileobj=f, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in sorted(members):
            info = tarfile.TarInfo(name)
            info.size, info.mtime, info.mode = len(data), 0, 0o644
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            tar.addfile(info, io.BytesIO(data))


# -----------------------------------------------------------------------------
# the corpus

MARKER = ".blip_synth"  # written first, so a half-written corpus is still recognised as ours


def _prepare_out_dir(out: Path) -> None:
    """Create out, or clear the outputs of an earlier corpus there; refuse a foreign non-empty folder."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"{out} exists and is not a folder")
    if out.exists() and any(out.iterdir()):
        if not (out / MARKER).exists():
            raise ValueError(f"{out} is not empty and holds no synthetic corpus ({MARKER}); pick another --out")
        for split in SPLIT_CODES:
            shutil.rmtree(out / "images" / split, ignore_errors=True)
        for shard in (out / "shards").glob("pretrain-*.tar"):
            shard.unlink()
    out.mkdir(parents=True, exist_ok=True)
    (out / MARKER).write_text("blip synthetic corpus\n")


def generate_corpus(out_dir, seed: int = 0, n_train: int = 4000, n_clean: int = 500, n_test: int = 200,
                    noise_fraction: float = 0.3, image_size: int = 128, shard_size: int = 500,
                    clean_refs: int = 5, test_refs: int = 5, questions_per_image: int = 5,
                    noise_kinds: tuple[str, ...] = NOISE_KINDS, n_val: int = 200, nlvr_statements: int = 4) -> dict:
    """Write the synthetic corpus to out_dir and return a summary (counts per split and noise kind).

    Splits: `train` = noisy web pairs (pretrain.json and the tar shards; VQA questions about its images in
    vqa_train_web.json), `clean` = "human-annotated"
    images with clean_refs captions each (clean_train.json, vqa_train.json, nlvr_train.json), `val`
    and `test` = images with test_refs captions (val.json, val_gt.json, vqa_val.json, nlvr_dev.json;
    test.json, test_gt.json, vqa_test.json, nlvr_test.json). Exactly round(noise_fraction * n_train)
    web pairs are noisy, spread evenly over noise_kinds. Each annotated image heads one NLVR pair
    with nlvr_statements statements, half true. Same arguments, same bytes; the files that existed
    before val and NLVR (all but the vqa files, answer_list.json and metadata.json) do not depend on
    n_val or nlvr_statements.
    """
    if not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    for name, v in (("n_train", n_train), ("n_clean", n_clean), ("n_test", n_test), ("n_val", n_val)):
        if v < 0:
            raise ValueError(f"{name} must be >= 0, got {v}")
    if not 0.0 <= noise_fraction <= 1.0:
        raise ValueError(f"noise_fraction must be in [0, 1], got {noise_fraction}")
    if image_size < 32:
        raise ValueError(f"image_size must be >= 32, got {image_size}")
    if shard_size < 1:
        raise ValueError(f"shard_size must be >= 1, got {shard_size}")
    if not 1 <= clean_refs <= 6 or not 1 <= test_refs <= 6:
        raise ValueError("clean_refs and test_refs must be in 1..6 (the fewest templates a scene has)")
    unknown = [k for k in noise_kinds if k not in NOISE_KINDS]
    if unknown or not noise_kinds:
        raise ValueError(f"noise_kinds must be a non-empty subset of {NOISE_KINDS}, got {noise_kinds}")
    if "swapped" in noise_kinds and n_train < 2 and noise_fraction > 0:
        raise ValueError("swapped noise needs n_train >= 2")
    if not 0 <= nlvr_statements <= 8:
        raise ValueError(f"nlvr_statements must be in 0..8, got {nlvr_statements}")

    out = Path(out_dir)
    _prepare_out_dir(out)
    sizes = {"train": n_train, "clean": n_clean, "test": n_test, "val": n_val}
    scenes, paths = {}, {}
    train_jpegs = []
    for split, n in sizes.items():
        (out / "images" / split).mkdir(parents=True, exist_ok=True)
        scenes[split], paths[split] = [], []
        for i in range(n):
            scene = sample_scene(np.random.default_rng([seed, SPLIT_CODES[split], i]), image_size)
            jpeg = encode_jpeg(render_scene(scene, image_size))
            rel = f"images/{split}/{i:08d}.jpg"
            (out / rel).write_bytes(jpeg)
            scenes[split].append(scene)
            paths[split].append(rel)
            if split == "train":
                train_jpegs.append(jpeg)

    # web pairs: a clean caption for every image, then noise on a fixed-size random subset
    clean_captions, templates = [], []
    for i, scene in enumerate(scenes["train"]):
        rng = np.random.default_rng([seed, SPLIT_CODES["train"], i, 1])
        cap_seed = int(rng.integers(2**31))
        variants = caption_variants(scene, cap_seed)
        t = int(rng.integers(len(variants)))
        clean_captions.append(variants[t])
        templates.append((t, cap_seed))
    noise = [None] * n_train
    order = np.random.default_rng([seed, 7]).permutation(n_train)
    for j, i in enumerate(order[: int(round(noise_fraction * n_train))]):
        noise[int(i)] = noise_kinds[j % len(noise_kinds)]
    pretrain, pairs = [], []
    for i, scene in enumerate(scenes["train"]):
        rng = np.random.default_rng([seed, SPLIT_CODES["train"], i, 2])
        kind, detail, clean = noise[i], None, clean_captions[i]
        if kind is None:
            caption = _webify(clean, rng)
        elif kind == "swapped":
            j = i
            while j == i or clean_captions[j] == clean:  # another image's caption
                j = int(rng.integers(n_train))
            caption, detail = _webify(clean_captions[j], rng), paths["train"][j]
        elif kind == "wrong_attribute":
            caption, detail = _mutate(scene, *templates[i], clean, rng)
            caption = _webify(caption, rng)
        elif kind == "boilerplate":
            caption = _boilerplate(rng)
        else:
            caption = _pick(rng, SHORT)
        pretrain.append({"image": paths["train"][i], "caption": caption})
        pairs.append({"key": f"{i:09d}", "image": paths["train"][i], "caption": caption, "noise": kind,
                      "noise_detail": detail, "clean_caption": clean, "scene": scene})

    # annotated splits: several distinct true captions per image, and VQA pairs
    annotated = {}
    for split, k in (("clean", clean_refs), ("test", test_refs), ("val", test_refs)):
        annotated[split] = []
        for i, scene in enumerate(scenes[split]):
            rng = np.random.default_rng([seed, SPLIT_CODES[split], i, 1])
            variants = caption_variants(scene, int(rng.integers(2**31)))
            refs = list(dict.fromkeys(variants))  # distinct, in template order
            refs = _sample(rng, refs, k)
            qa = vqa_pairs(scene, rng, questions_per_image)
            annotated[split].append({"image": paths[split][i], "image_id": i, "captions": refs, "vqa": qa,
                                     "scene": scene})

    clean_train = [{"image": a["image"], "caption": c, "image_id": f"synth_{a['image_id']}"}
                   for a in annotated["clean"] for c in a["captions"]]
    # val/test: entry i of the list is COCO gt image "id" i (and the file is images/<split>/<i:08d>.jpg)
    karpathy = {s: [{"image": a["image"], "caption": a["captions"]} for a in annotated[s]] for s in ("val", "test")}
    coco_gt = {s: {"images": [{"id": a["image_id"]} for a in annotated[s]],
                   "annotations": [{"image_id": a["image_id"], "caption": c, "id": k}
                                   for k, (a, c) in enumerate((a, c) for a in annotated[s] for c in a["captions"])]}
               for s in ("val", "test")}

    # VQA: question ids run over clean, test, then val, so adding val left the earlier ids as they were; then
    # the same questions asked of the web images (as VQA v2 asks of COCO's train images, which pretraining
    # sees too): a larger train split for a VQA model trained from random weights
    def ask(owner: dict, qa, rng, qid: int) -> list[dict]:
        """The file entries of owner's questions qa (annotators drawn from rng); owner["questions"] = the truth."""
        entries, owner["questions"] = [], []
        for k, (q, ans, qtype) in enumerate(qa, start=qid):
            entries.append({"question_id": k, "image": owner["image"], "question": q,
                            "answer": annotator_answers(ans, qtype, rng), "dataset": "vqa",
                            "question_type": qtype, "answer_type": ANSWER_TYPES.get(qtype, "other")})
            owner["questions"].append({"question_id": k, "question": q, "answer": ans, "question_type": qtype})
        return entries

    vqa = {"clean": [], "test": [], "val": [], "train": []}
    qid = 0
    for split in ("clean", "test", "val"):
        for i, a in enumerate(annotated[split]):
            vqa[split] += ask(a, a["vqa"], np.random.default_rng([seed, SPLIT_CODES[split], i, 3]), qid)
            qid += len(a["vqa"])
    for i, (scene, pair) in enumerate(zip(scenes["train"], pairs)):
        rng = np.random.default_rng([seed, SPLIT_CODES["train"], i, 5])
        vqa["train"] += ask(pair, vqa_pairs(scene, rng, questions_per_image), rng, qid)
        qid += len(pair["questions"])
    answer_list = sorted({q["answer"] for owner in [*annotated["clean"], *annotated["test"], *annotated["val"], *pairs]
                          for q in owner["questions"]})

    # NLVR: image i of a split is the left image of one pair, with a random other image on the right
    nlvr, nlvr_meta = {}, {}
    for split, name in (("clean", "train"), ("val", "dev"), ("test", "test")):
        nlvr[name], nlvr_meta[name] = [], []
        n = len(annotated[split])
        for i in range(n if n >= 2 else 0):
            rng = np.random.default_rng([seed, SPLIT_CODES[split], i, 4])
            j = (i + 1 + int(rng.integers(n - 1))) % n
            left, right = annotated[split][i], annotated[split][j]
            labels = [(i + t) % 2 == 0 for t in range(nlvr_statements)]  # half true, per pair and per split
            for claim, truth, evidence in nlvr_statements_for(left["scene"], right["scene"], labels, rng):
                item = {"images": [left["image"], right["image"]], "sentence": nlvr_sentence(claim),
                        "label": str(truth)}
                nlvr[name].append(item)
                nlvr_meta[name].append({**item, "claim": claim, "evidence": evidence})

    noise_counts = {k: sum(1 for x in noise if x == k) for k in NOISE_KINDS}
    counts = {"train": n_train, "noisy": sum(noise_counts.values()), "noise": noise_counts,
              "clean": n_clean, "clean_captions": len(clean_train), "val": n_val, "test": n_test,
              "vqa_train": len(vqa["clean"]), "vqa_val": len(vqa["val"]), "vqa_test": len(vqa["test"]),
              "vqa_train_web": len(vqa["train"]),
              "answers": len(answer_list), "nlvr_train": len(nlvr["train"]), "nlvr_dev": len(nlvr["dev"]),
              "nlvr_test": len(nlvr["test"]), "shards": (n_train + shard_size - 1) // shard_size}
    params = {"seed": seed, "n_train": n_train, "n_clean": n_clean, "n_val": n_val, "n_test": n_test,
              "noise_fraction": noise_fraction, "image_size": image_size, "shard_size": shard_size,
              "clean_refs": clean_refs, "test_refs": test_refs, "questions_per_image": questions_per_image,
              "noise_kinds": list(noise_kinds), "nlvr_statements": nlvr_statements}
    write_json(out / "pretrain.json", pretrain)
    write_json(out / "clean_train.json", clean_train)
    for split in ("val", "test"):
        write_json(out / f"{split}.json", karpathy[split])
        write_json(out / f"{split}_gt.json", coco_gt[split])
    for split, name in (("clean", "train"), ("val", "val"), ("test", "test"), ("train", "train_web")):
        write_json(out / f"vqa_{name}.json", vqa[split])
    write_json(out / "answer_list.json", answer_list)
    for name in nlvr:
        write_json(out / f"nlvr_{name}.json", nlvr[name])
    keep = ("image", "image_id", "captions", "questions", "scene")
    write_json(out / "metadata.json", {
        "version": 2, "params": params, "counts": counts,
        "vocabulary": {"shapes": list(SHAPES), "colors": COLORS, "background_colors": BACKGROUND_COLORS,
                       "sizes": list(SIZES), "positions": list(ANCHORS), "noise_kinds": list(NOISE_KINDS)},
        "pretrain": pairs,
        **{split: [{k: a[k] for k in keep} for a in annotated[split]] for split in ("clean", "val", "test")},
        "nlvr": nlvr_meta})

    # webdataset shards, laid out as img2dataset writes them
    (out / "shards").mkdir(exist_ok=True)
    for s in range(counts["shards"]):
        members = []
        for i in range(s * shard_size, min((s + 1) * shard_size, n_train)):
            p = pairs[i]
            meta = {"key": p["key"], "caption": p["caption"], "noise": p["noise"], "clean_caption": p["clean_caption"],
                    "image": p["image"], "status": "success", "width": image_size, "height": image_size}
            members += [(f"{p['key']}.jpg", train_jpegs[i]), (f"{p['key']}.txt", p["caption"].encode("utf-8")),
                        (f"{p['key']}.json", json.dumps(meta, ensure_ascii=False).encode("utf-8"))]
        write_tar(out / "shards" / f"pretrain-{s:05d}.tar", members)
    return counts


def summary_line(counts: dict, out_dir) -> str:
    noise = ", ".join(f"{k} {v}" for k, v in counts["noise"].items())
    return (f"{counts['train']} web pairs ({counts['noisy']} noisy: {noise}) in {counts['shards']} shards, "
            f"{counts['clean']} clean images ({counts['clean_captions']} captions), {counts['val']} val / "
            f"{counts['test']} test images, vqa {counts['vqa_train']} train (+ {counts['vqa_train_web']} on web "
            f"images) / {counts['vqa_val']} val / {counts['vqa_test']} test questions, nlvr {counts['nlvr_train']} "
            f"train / {counts['nlvr_dev']} dev / {counts['nlvr_test']} test statements -> {out_dir}")


# -----------------------------------------------------------------------------
# command line

def _add_synth_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", required=True, help="output folder (created; an earlier corpus there is replaced)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--train", type=int, default=4000, help="noisy web image-text pairs")
    p.add_argument("--clean", type=int, default=500, help="clean images with several captions and VQA pairs")
    p.add_argument("--val", type=int, default=200, help="val images with 5 captions, VQA pairs and NLVR pairs")
    p.add_argument("--test", type=int, default=200, help="test images with 5 captions, VQA pairs and NLVR pairs")
    p.add_argument("--nlvr-statements", type=int, default=4, help="NLVR statements per image pair (half true)")
    p.add_argument("--noise", type=float, default=0.3, help="fraction of noisy web pairs")
    p.add_argument("--image-size", type=int, default=128)
    p.add_argument("--shard-size", type=int, default=500, help="samples per tar shard")


def cmd_synth(args) -> int:
    t0 = time.perf_counter()
    try:
        counts = generate_corpus(args.out, seed=args.seed, n_train=args.train, n_clean=args.clean,
                                 n_test=args.test, noise_fraction=args.noise, image_size=args.image_size,
                                 shard_size=args.shard_size, n_val=args.val, nlvr_statements=args.nlvr_statements)
    except (ValueError, OSError) as e:
        print(f"blip: error: {e}", file=sys.stderr)
        return 2
    print(f"{summary_line(counts, args.out)} ({time.perf_counter() - t0:.1f}s)")
    return 0


def add_cli(subparsers) -> None:
    """Register `data synth` on the main CLI's subparsers; commands dispatch through args.func(args)."""
    p = subparsers.add_parser("data", help="datasets: generate the synthetic corpus")
    sub = p.add_subparsers(dest="data_command", metavar="{synth}")
    s = sub.add_parser("synth", help="write the deterministic synthetic web corpus (images, JSON, tar shards)")
    _add_synth_arguments(s)
    s.set_defaults(func=cmd_synth)

    def no_subcommand(args) -> int:
        p.print_help(sys.stderr)
        return 2
    p.set_defaults(func=no_subcommand)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m blip.data.synth", description="write the synthetic corpus")
    _add_synth_arguments(ap)
    return cmd_synth(ap.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
