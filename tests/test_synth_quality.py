"""The synthetic-corpus probes (benchmarks/synthetic_quality.py): scoring rules by hand, and the harness
end to end on a tiny model."""
import json
from collections import Counter
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import blip
from blip.checkpoint import save_blip
from blip.data import generate_corpus
from blip.data.synth import caption_variants, sample_scene
from blip.data.synth_quality import ATTRIBUTES, attribute_pairs, bindings, caption_correct

ROOT = Path(__file__).resolve().parents[1]


def _scene(objects, relations=()):
    return {"background": {"kind": "solid", "colors": ["gray"]}, "objects": objects, "relations": list(relations)}


def _obj(shape, color, size="large", position="center"):
    return {"shape": shape, "color": color, "size": size, "position": position, "x": 32, "y": 32, "r": 8}


def test_bindings_and_caption_scoring():
    assert bindings("a picture of a large red circle and a blue star") == {("red", "circle"), ("blue", "star")}
    assert bindings("a circle colored red") == {("red", "circle")}
    one = _scene([_obj("circle", "red")])
    assert caption_correct("a small red circle on a gray background", one) == \
        {"scored": "single", "correct": True, "strict": True, "target": "large red circle"}
    assert caption_correct("a red square", one)["correct"] is False
    assert caption_correct("a red circle and a blue star", one) == \
        {"scored": "single", "correct": True, "strict": False, "target": "large red circle"}
    two = _scene([_obj("star", "blue", "small", "left"), _obj("circle", "red", "large", "right")])
    assert caption_correct("a blue star and a red circle", two)["correct"] is True
    assert caption_correct("a blue star", two)["target"] == "large red circle"  # the larger object counts
    assert caption_correct("a red star and a blue circle", two)["correct"] is False  # colours bound wrongly
    same_size = _scene([_obj("star", "blue"), _obj("circle", "red", position="left")])
    assert caption_correct("anything", same_size) == {"scored": None}


def test_attribute_pairs_change_exactly_the_attribute_named():
    rng = np.random.default_rng(0)
    seen = set()
    for k in range(60):
        scene = sample_scene(rng, 64)
        variants = caption_variants(scene, 7 + k)
        for true, false, attr in attribute_pairs(scene, 7 + k):
            seen.add(attr)
            assert true in variants and false != true
            a, b = Counter(true.split()), Counter(false.split())
            diff = set((a - b) + (b - a))
            assert diff or attr == "relation"  # a relation swap may only reorder the same words
            if attr == "color":
                assert diff & {"red", "green", "blue", "yellow", "orange", "purple", "pink", "white", "black",
                               "brown", "cyan"}
            if attr == "size":
                assert diff <= {"small", "large"}
    assert seen == set(ATTRIBUTES)


@pytest.fixture(scope="module")
def tiny_setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("sq")
    generate_corpus(root / "corpus", seed=0, n_train=4, n_clean=1, n_test=12, image_size=64, shard_size=4)
    torch.manual_seed(0)
    save_blip(blip.create_model("tiny", task="pretrain", device="cpu"), root / "model")
    return root


def test_probe_harness_on_a_tiny_model(tiny_setup):
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "synthetic_quality.py"), str(tiny_setup / "model"),
                          "--corpus", str(tiny_setup / "corpus"), "--k-test", "4", "--json"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    r = json.loads(out.stdout)
    assert r["test_images"] == 12 and r["itm_pairs"] >= 12
    assert 0.0 <= r["itm_attribute_accuracy"] <= 100.0 and r["itm_bce"] > 0
    assert 0.0 <= r["lm_attribute_accuracy"] <= 100.0 and set(r["lm_by_attribute"]) <= set(r["itm_by_attribute"])
    for key in ("retrieval_itc", "retrieval_itm"):
        assert set(r[key]) >= {"tr@1", "ir@1", "tr@5", "ir@5"}
    counts = r["caption_counts"]
    assert counts["single"] > 0 and len(r["caption_examples"]) == min(6, counts["single"] + counts["two_larger"])
    # an untrained model knows nothing: far from the targets
    assert r["itm_attribute_accuracy"] < 90 and r["caption_single"] < 50


def test_probe_harness_refuses_a_folder_without_scenes(tiny_setup, tmp_path):
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "synthetic_quality.py"), str(tiny_setup / "model"),
                          "--corpus", str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "metadata.json" in out.stderr and "Traceback" not in out.stderr
