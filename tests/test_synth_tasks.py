"""The synthetic corpus's downstream files: the val split, VQA with 10 simulated annotators, NLVR2-style
statements. Checked against the scenes in metadata.json with rules written here independently of the
generator (the official VQA normalisation and accuracy, a parser of the NLVR sentences)."""
import argparse
import hashlib
import json
import re
from collections import Counter
from pathlib import Path

import pytest

from blip.data import add_cli, generate_corpus
from blip.data.synth import COLORS, SHAPES, SIZES

TINY = dict(n_train=12, n_clean=6, n_val=6, n_test=5, shard_size=8, image_size=32)


def load(root: Path, name: str):
    return json.loads((root / name).read_text())


def digests(root: Path) -> dict:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    out = tmp_path_factory.mktemp("tasks")
    counts = generate_corpus(out, seed=0, **TINY)
    return out, counts, load(out, "metadata.json")


# -----------------------------------------------------------------------------
# determinism, and the files that existed before val/VQA annotators/NLVR do not move

def test_same_arguments_same_bytes(corpus, tmp_path):
    root, _, _ = corpus
    generate_corpus(tmp_path, seed=0, **TINY)
    a, b = digests(root), digests(tmp_path)
    assert a == b
    for name in ("val.json", "val_gt.json", "vqa_val.json", "nlvr_train.json", "nlvr_dev.json", "nlvr_test.json",
                 "images/val/00000000.jpg"):
        assert name in a


def test_earlier_files_do_not_depend_on_val_or_nlvr(tmp_path):
    base = dict(TINY)
    base.pop("n_val")
    generate_corpus(tmp_path / "without", seed=2, n_val=0, nlvr_statements=0, **base)
    generate_corpus(tmp_path / "with", seed=2, n_val=7, nlvr_statements=6, **base)
    a, b = digests(tmp_path / "without"), digests(tmp_path / "with")
    earlier = [k for k in a if k.split("/")[0] in ("pretrain.json", "clean_train.json", "test.json", "test_gt.json",
                                                  "shards", "images")]
    assert len(earlier) == 4 + 2 + 12 + 6 + 5 and all(a[k] == b[k] for k in earlier)
    assert not any((tmp_path / "without" / "images" / "val").iterdir())
    assert len(list((tmp_path / "with" / "images" / "val").iterdir())) == 7
    for name in ("vqa_train.json", "vqa_test.json"):  # same questions and ids; only the answers are new
        qa = [[(q["question_id"], q["image"], q["question"]) for q in load(tmp_path / d, name)]
              for d in ("without", "with")]
        assert qa[0] == qa[1] and qa[0]


# -----------------------------------------------------------------------------
# val split: Karpathy-style list + COCO gt, entry i = gt image id i = file images/val/<i>.jpg

@pytest.mark.parametrize("split", ["val", "test"])
def test_karpathy_entries_map_to_gt_ids_by_index_and_file_name(corpus, split):
    root, counts, meta = corpus
    entries, gt = load(root, f"{split}.json"), load(root, f"{split}_gt.json")
    assert len(entries) == counts[split] == len(meta[split])
    assert [im["id"] for im in gt["images"]] == list(range(len(entries)))
    refs = {}
    for a in gt["annotations"]:
        refs.setdefault(a["image_id"], []).append(a["caption"])
    assert len({a["id"] for a in gt["annotations"]}) == len(gt["annotations"])
    for i, e in enumerate(entries):
        assert set(e) == {"image", "caption"} and e["image"] == f"images/{split}/{i:08d}.jpg"
        assert (root / e["image"]).is_file()
        assert int(e["image"].split("/")[-1].strip(".jpg").split("_")[-1]) == i  # the official id rule
        assert refs[i] == e["caption"] == meta[split][i]["captions"] and len(set(e["caption"])) == 5


# -----------------------------------------------------------------------------
# VQA: 10 annotators, the official normalisation and accuracy

NUMBER_WORDS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
                "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}


def vqa_normalise(answer: str) -> str:
    """The official VQA eval's rules that apply to single words: full stops not before a digit
    dropped, lower case, number words to digits, articles dropped."""
    text = re.sub(r"\.(?!\d)", "", answer.strip())
    words = [NUMBER_WORDS.get(w, w) for w in text.lower().split()]
    return " ".join(w for w in words if w not in ("a", "an", "the"))


def vqa_accuracy(prediction: str, answers: list[str], normalise=True) -> float:
    """min(#matching others / 3, 1) averaged over the leave-one-out subsets of the annotators."""
    if normalise and len(set(answers)) > 1:
        answers, prediction = [vqa_normalise(a) for a in answers], vqa_normalise(prediction)
    return sum(min(1.0, sum(a == prediction for j, a in enumerate(answers) if j != i) / 3)
               for i in range(len(answers))) / len(answers)


def test_vqa_files_annotators_and_accuracy(corpus):
    root, counts, meta = corpus
    # file: (its images' folder, their metadata entries); the web images' entries are metadata's "pretrain"
    files = {"vqa_train.json": ("clean", "clean"), "vqa_val.json": ("val", "val"), "vqa_test.json": ("test", "test"),
             "vqa_train_web.json": ("train", "pretrain")}
    answer_list = set(load(root, "answer_list.json"))
    canonical, spelled, wrong_once, ids = {}, 0, 0, []
    for name, (split, entries) in files.items():
        questions = load(root, name)
        assert len(questions) == counts[name[:-5]] == 5 * counts[split]
        truth = {q["question_id"]: q for a in meta[entries] for q in a["questions"]}
        for q in questions:
            assert q["image"].startswith(f"images/{split}/") and q["dataset"] == "vqa" and len(q["answer"]) == 10
            t = truth[q["question_id"]]
            ans = t["answer"]
            assert ans in answer_list and q["question_type"] == t["question_type"]
            assert q["answer_type"] == {"count": "number", "exists": "yes/no"}.get(q["question_type"], "other")
            normalised = Counter(vqa_normalise(a) for a in q["answer"])
            assert normalised[ans] >= 8 and normalised.most_common(1)[0][0] == ans, q
            assert vqa_accuracy(ans, q["answer"]) == 1.0
            spelled += vqa_accuracy(ans, q["answer"], normalise=False) < 1.0
            for other, n in normalised.items():
                if other != ans and n == 1:
                    wrong_once += 1
                    assert vqa_accuracy(other, q["answer"]) == pytest.approx(0.3)
            ids.append(q["question_id"])
    assert len(set(ids)) == len(ids)
    assert spelled > 0 and wrong_once > 0  # both rules of the official scorer matter on this corpus
    types = {q["question_type"] for name in files for q in load(root, name)}
    assert {"color", "shape", "count", "exists", "size", "position"} <= types


# -----------------------------------------------------------------------------
# NLVR: every sentence judged from the two scenes by a parser written here

NUM = {"one": 1, "two": 2, "three": 3, "four": 4, "five": 5, "six": 6}
WORD = r"(\w+)"
RULES = [  # (pattern, truth from (groups, left objects, right objects))
    (rf"there are {WORD} shapes? in total", lambda g, L, R: len(L) + len(R) == NUM[g[0]]),
    (rf"both images contain exactly {WORD} shapes?", lambda g, L, R: len(L) == len(R) == NUM[g[0]]),
    (r"the (left|right) image has more shapes than the (left|right) image",
     lambda g, L, R: g[0] != g[1] and (len(L) > len(R)) == (g[0] == "left") and len(L) != len(R)),
    (r"both images have the same number of shapes", lambda g, L, R: len(L) == len(R)),
    (rf"both images contain an? {WORD} shape", lambda g, L, R: all(any(o["color"] == g[0] for o in X) for X in (L, R))),
    (rf"both images contain an? {WORD}", lambda g, L, R: all(any(o["shape"] == g[0] for o in X) for X in (L, R))),
    (rf"exactly one image contains an? {WORD} shape",
     lambda g, L, R: sum(any(o["color"] == g[0] for o in X) for X in (L, R)) == 1),
    (rf"the (left|right) image contains exactly {WORD} shapes?",
     lambda g, L, R: len(L if g[0] == "left" else R) == NUM[g[1]]),
    (rf"the (left|right) image contains an? {WORD} {WORD}",
     lambda g, L, R: any((o["color"], o["shape"]) == g[1:] for o in (L if g[0] == "left" else R))),
    (rf"there is an? {WORD} {WORD} in the (left|right) image",
     lambda g, L, R: any((o["size"], o["shape"]) == g[:2] for o in (L if g[2] == "left" else R))),
]


def judge(sentence: str, left: list, right: list) -> bool:
    text = sentence.lower().rstrip(".")
    for pattern, rule in RULES:
        if m := re.fullmatch(pattern, text):
            words = set(m.groups()) - {"left", "right"} - set(NUM)
            assert words <= set(COLORS) | set(SHAPES) | set(SIZES), sentence
            return rule(m.groups(), left, right)
    raise AssertionError(f"unexpected NLVR sentence {sentence!r}")


def swap_sides(sentence: str) -> str:
    return re.sub(r"\b(left|right)\b", lambda m: "right" if m[1] == "left" else "left", sentence)


def test_nlvr_labels_follow_the_scenes_and_are_balanced(corpus):
    root, counts, meta = corpus
    for name, split in (("train", "clean"), ("dev", "val"), ("test", "test")):
        items, truth = load(root, f"nlvr_{name}.json"), meta["nlvr"][name]
        assert len(items) == counts[f"nlvr_{name}"] == 4 * counts[split] == len(truth)
        scenes = {a["image"]: a["scene"]["objects"] for a in meta[split]}
        labels = Counter(e["label"] for e in items)
        assert labels["True"] == labels["False"] == len(items) // 2
        pairs = Counter(tuple(e["images"]) for e in items)
        assert all(n == 4 for n in pairs.values()) and len(pairs) == counts[split]
        assert sorted(p[0] for p in pairs) == sorted(scenes)  # every image heads one pair
        for pair in pairs:
            assert Counter(e["label"] for e in items if tuple(e["images"]) == pair) == {"True": 2, "False": 2}
        for e, t in zip(items, truth):
            assert set(e) == {"images", "sentence", "label"} and e["label"] in ("True", "False")
            assert {k: t[k] for k in e} == e and t["claim"]["kind"] and t["evidence"]
            left, right = (scenes[p] for p in e["images"])
            assert e["images"][0] != e["images"][1] and all(p.startswith(f"images/{split}/") for p in e["images"])
            assert judge(e["sentence"], left, right) == (e["label"] == "True"), e
            # the official augmentation: swap the images, and "left"/"right" when the sentence has them
            assert judge(swap_sides(e["sentence"]), right, left) == (e["label"] == "True"), e
    assert len({t["claim"]["kind"] for t in meta["nlvr"]["train"]}) >= 6


def test_cli_flags_and_summary(tmp_path, capsys):
    ap = argparse.ArgumentParser(prog="blip")
    add_cli(ap.add_subparsers(dest="command"))
    args = ap.parse_args(["data", "synth", "--out", str(tmp_path / "c"), "--train", "4", "--clean", "3", "--val", "3",
                          "--test", "2", "--nlvr-statements", "2", "--image-size", "32", "--shard-size", "4"])
    assert args.func(args) == 0
    line = capsys.readouterr().out
    assert "3 val / 2 test images" in line and "nlvr 6 train / 6 dev / 4 test statements" in line
    meta = load(tmp_path / "c", "metadata.json")
    assert meta["params"]["n_val"] == 3 and meta["params"]["nlvr_statements"] == 2
    assert meta["counts"]["vqa_val"] == len(load(tmp_path / "c", "vqa_val.json")) == 15
    args = ap.parse_args(["data", "synth", "--out", str(tmp_path / "d"), "--nlvr-statements", "9"])
    assert args.func(args) == 2 and "nlvr_statements" in capsys.readouterr().err
