"""Image index and search (blip.index): nearest neighbours, incremental updates, the model check, the CLI."""
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import blip
from blip.checkpoint import save_blip
from blip.cli import main
from blip.index import ImageIndex, IndexModelError, build_index, fingerprint

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    torch.manual_seed(0)
    m = blip.create_model("tiny", task="retrieval")
    with torch.no_grad():  # away from BERT's 0.02 init, so different images embed apart
        for p in m.parameters():
            p.add_(0.2 * torch.randn_like(p))
    folder = tmp_path_factory.mktemp("model") / "tiny"
    save_blip(m, folder)
    return folder


@pytest.fixture(scope="module")
def model(model_dir):
    return blip.load(str(model_dir))


def _images(folder, n, seed=0):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(folder / f"img{i}.png")
    return sorted(str((folder / f"img{i}.png").resolve()) for i in range(n))


def test_search_finds_each_image_by_its_own_embedding(model, tmp_path):
    paths = _images(tmp_path / "photos", 6)
    index = build_index(model, tmp_path / "photos", tmp_path / "idx", progress=False)
    assert len(index) == 6 and sorted(index.paths) == paths and index.kind == "flat"
    reopened = ImageIndex.open(tmp_path / "idx")
    assert reopened.paths == index.paths
    for p in paths:
        hits = reopened.search(model, Image.open(p), k=3)  # a str is a text query; an image is PIL or a Path
        assert reopened.search(model, Path(p), k=3) == hits
        assert hits[0]["path"] == p and hits[0]["score"] == pytest.approx(1.0, abs=1e-4)
        assert hits[0]["score"] >= hits[1]["score"] >= hits[2]["score"]
    # a text query ranks by the cosine of the ITC embeddings
    text = model.embed_texts(["a red circle"])[0]
    expected = sorted(paths, key=lambda p: -float(model.embed_images([p])[0] @ text))
    assert [h["path"] for h in reopened.search(model, "a red circle", k=6)] == expected


def test_rerank_scores_with_itm(model, tmp_path):
    _images(tmp_path / "photos", 4)
    index = build_index(model, tmp_path / "photos", tmp_path / "idx", progress=False)
    hits = index.search(model, "a red circle", k=2, rerank=True)
    assert len(hits) == 2
    for h in hits:
        assert h["itm"] == pytest.approx(float(model.match(h["path"], "a red circle")["itm"][0]), abs=1e-5)
    assert hits[0]["itm"] >= hits[1]["itm"]
    with pytest.raises(ValueError, match="rerank needs a text"):
        index.search(model, Image.open(hits[0]["path"]), rerank=True)


def test_incremental_update_adds_changes_and_drops(model, tmp_path):
    paths = _images(tmp_path / "photos", 4)
    build_index(model, tmp_path / "photos", tmp_path / "idx", progress=False)
    before = ImageIndex.open(tmp_path / "idx")
    ids = {r["path"]: r["id"] for r in before.items}
    os.remove(paths[0])
    Image.new("RGB", (40, 48), (10, 200, 30)).save(paths[1])  # changed: another image under the same name
    os.utime(paths[1], ns=(before.items[1]["mtime_ns"] + 10**9,) * 2)
    new = tmp_path / "photos" / "new.png"
    Image.new("RGB", (40, 48), (200, 10, 30)).save(new)
    index = build_index(model, tmp_path / "photos", tmp_path / "idx", progress=False)
    assert index.last_update == {"added": 1, "updated": 1, "removed": 1, "kept": 2, "skipped": 0}
    assert sorted(index.paths) == sorted([*paths[1:], str(new.resolve())])
    kept = {r["path"]: r["id"] for r in index.items}
    assert kept[paths[2]] == ids[paths[2]] and kept[paths[1]] not in ids.values()  # changed files get new ids
    hit = ImageIndex.open(tmp_path / "idx").search(model, Image.open(paths[1]), k=1)[0]
    assert hit["path"] == paths[1] and hit["score"] == pytest.approx(1.0, abs=1e-4)  # the new pixels
    again = build_index(model, tmp_path / "photos", tmp_path / "idx", progress=False)
    assert again.last_update == {"added": 0, "updated": 0, "removed": 0, "kept": 4, "skipped": 0}


def test_another_model_is_refused(model, tmp_path):
    _images(tmp_path / "photos", 2)
    index = build_index(model, tmp_path / "photos", tmp_path / "idx", progress=False)
    other = blip.create_model("tiny", task="retrieval")
    assert fingerprint(other) != fingerprint(model)
    with pytest.raises(IndexModelError, match="built with another model"):
        index.search(other, "a dog")
    with pytest.raises(IndexModelError):
        build_index(other, tmp_path / "photos", tmp_path / "idx", progress=False)
    caption = blip.create_model("tiny", task="caption")
    with pytest.raises(blip.MissingPartError):
        build_index(caption, tmp_path / "photos", tmp_path / "idx2", progress=False)


def test_approximate_index_past_the_threshold(model, tmp_path):
    paths = _images(tmp_path / "photos", 4)
    index = build_index(model, tmp_path / "photos", tmp_path / "idx", progress=False, approx_min=5)
    assert index.kind == "flat"
    extra = _images(tmp_path / "more", 2, seed=1)
    index = build_index(model, [tmp_path / "more"], tmp_path / "idx", progress=False)  # the earlier files stay
    assert len(index) == 6 and index.kind == "hnsw" and ImageIndex.open(tmp_path / "idx").kind == "hnsw"
    for p in (paths[3], extra[1]):
        assert index.search(model, Image.open(p), k=1)[0]["path"] == p
    newest = tmp_path / "more" / "newest.png"
    Image.new("RGB", (40, 48), (0, 90, 250)).save(newest)
    index = build_index(model, tmp_path / "more", tmp_path / "idx", progress=False)  # appended to the graph
    assert index.index.ntotal == 7 and index.kind == "hnsw"
    assert ImageIndex.open(tmp_path / "idx").search(model, newest, k=1)[0]["path"] == str(newest.resolve())


def test_cli_round_trip(model_dir, tmp_path, capsys):
    paths = _images(tmp_path / "photos", 3)
    (tmp_path / "photos" / "broken.jpg").write_bytes(b"not an image")
    rc = main(["index", str(tmp_path / "photos"), "--model", str(model_dir), "--out", str(tmp_path / "idx"), "--json"])
    out, err = capsys.readouterr()
    assert rc == 1 and "broken.jpg" in err  # unreadable: skipped, reported, exit 1
    assert json.loads(out) == {"index": str(tmp_path / "idx"), "images": 3, "kind": "flat", "added": 3,
                               "updated": 0, "removed": 0, "kept": 0, "skipped": 1}
    # the model defaults to the one the index was built with
    assert main(["search", str(tmp_path / "idx"), "--image", paths[2], "--k", "2", "--json"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["rank"] for r in rows] == [1, 2] and rows[0]["path"] == paths[2]
    assert main(["search", str(tmp_path / "idx"), "a red circle", "--rerank", "--k", "3"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 3 and all(len(line.split("\t")) == 4 for line in lines)
    assert main(["search", str(tmp_path / "idx"), "a dog", "--model", "tiny"]) == 2
    assert "built with another model" in capsys.readouterr().err
    assert main(["search", str(tmp_path / "nothing"), "a dog"]) == 2
    assert "no image index" in capsys.readouterr().err
