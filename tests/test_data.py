"""The data layer: synthetic corpus (determinism, truthful captions, noise, VQA), JSON and shard datasets
(skipping bad samples, rank/worker splitting, exact resume)."""
import argparse
import io
import json
import math
import re
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from blip.data import JsonCaptionDataset, ShardDataset, add_cli, collate, expand_shards, generate_corpus
from blip.data.synth import COLORS, NOISE_KINDS, SHAPES
from blip.tokenizer import pre_caption
from blip.transform import EvalTransform, TrainTransform

SMALL = dict(n_train=40, n_clean=8, n_val=5, n_test=6, shard_size=16, image_size=128)


def words(text):
    return re.findall(r"[a-z]+", text.lower())


def no_image(img):
    """A transform that skips the image work: for tests about order and splitting."""
    return torch.zeros(1)


def all_files(root: Path) -> dict:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    out = tmp_path_factory.mktemp("corpus")
    counts = generate_corpus(out, seed=0, **SMALL)
    meta = json.loads((out / "metadata.json").read_text())
    return out, counts, meta


# -----------------------------------------------------------------------------
# the synthetic corpus

def test_same_seed_same_bytes_other_seed_differs(tmp_path, corpus):
    root, _, _ = corpus
    generate_corpus(tmp_path / "again", seed=0, **SMALL)
    generate_corpus(tmp_path / "other", seed=1, **SMALL)
    a, b, c = all_files(root), all_files(tmp_path / "again"), all_files(tmp_path / "other")
    assert list(a) == list(b) and any(k.startswith("shards/") for k in a)
    assert [k for k in a if a[k] != b[k]] == []
    for name in ("pretrain.json", "shards/pretrain-00000.tar", "images/train/00000000.jpg", "vqa_train.json"):
        assert a[name] != c[name], name


def test_regenerating_into_a_corpus_folder_replaces_it_and_foreign_folders_are_refused(tmp_path):
    generate_corpus(tmp_path / "c", n_train=20, n_clean=1, n_val=1, n_test=1, shard_size=5, image_size=32)
    assert len(list((tmp_path / "c" / "shards").glob("*.tar"))) == 4
    generate_corpus(tmp_path / "c", n_train=6, n_clean=1, n_val=1, n_test=1, shard_size=5, image_size=32)
    assert len(list((tmp_path / "c" / "shards").glob("*.tar"))) == 2  # no stale shards left behind
    assert len(list((tmp_path / "c" / "images" / "train").iterdir())) == 6
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(ValueError, match="not empty"):
        generate_corpus(tmp_path / "mine", n_train=2, n_clean=1, n_test=1)
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"


def test_counts_formats_and_noise_fraction(corpus):
    root, counts, meta = corpus
    pretrain = json.loads((root / "pretrain.json").read_text())
    clean = json.loads((root / "clean_train.json").read_text())
    test = json.loads((root / "test.json").read_text())
    test_gt = json.loads((root / "test_gt.json").read_text())
    assert len(pretrain) == 40 and all(set(e) == {"image", "caption"} for e in pretrain)
    assert len(clean) == 8 * 5 and all(set(e) == {"image", "caption", "image_id"} for e in clean)
    assert len({e["image_id"] for e in clean}) == 8
    assert len(test) == 6 and all(set(e) == {"image", "caption"} and len(set(e["caption"])) == 5 for e in test)
    assert len(test_gt["images"]) == 6 and len(test_gt["annotations"]) == 30
    for e in pretrain + clean + test:
        assert (root / e["image"]).is_file()
    with Image.open(root / pretrain[0]["image"]) as im:
        assert im.format == "JPEG" and im.size == (128, 128)
    noisy = [p for p in meta["pretrain"] if p["noise"] is not None]
    assert len(noisy) == round(0.3 * 40) == counts["noisy"]
    assert sum(counts["noise"].values()) == len(noisy)
    assert counts["shards"] == 3 and len(list((root / "shards").glob("pretrain-*.tar"))) == 3
    assert meta["params"]["seed"] == 0 and meta["counts"] == counts


def test_every_noise_kind_present_and_really_noisy(tmp_path):
    generate_corpus(tmp_path, n_train=200, n_clean=0, n_val=0, n_test=0, noise_fraction=0.4, image_size=32)
    pairs = json.loads((tmp_path / "metadata.json").read_text())["pretrain"]
    by_kind = {k: [p for p in pairs if p["noise"] == k] for k in NOISE_KINDS}
    assert all(len(v) == 20 for v in by_kind.values()), {k: len(v) for k, v in by_kind.items()}
    assert {p["noise_detail"] for p in by_kind["wrong_attribute"]} == {"color", "shape", "size", "relation"}
    clean_by_image = {p["image"]: p["clean_caption"] for p in pairs}
    vocabulary = set(COLORS) | set(SHAPES)
    for p in pairs:
        caption, clean = pre_caption(p["caption"]), pre_caption(p["clean_caption"])
        if p["noise"] is None:
            assert caption == clean
        elif p["noise"] == "swapped":
            assert caption == pre_caption(clean_by_image[p["noise_detail"]]) != clean
        elif p["noise"] == "wrong_attribute":
            assert caption != clean and p["noise_detail"] in ("color", "shape", "size", "relation")
            if p["noise_detail"] in ("color", "shape"):
                assert set(words(caption)) & vocabulary != set(words(clean)) & vocabulary
        else:  # boilerplate / short: says nothing about the scene
            assert not set(words(caption)) & vocabulary, p["caption"]


def test_clean_captions_name_the_rendered_colours_and_shapes(corpus):
    root, _, meta = corpus
    entries = [(p["image"], [p["caption"]], p["scene"]) for p in meta["pretrain"] if p["noise"] is None]
    entries += [(a["image"], a["captions"], a["scene"]) for a in meta["clean"] + meta["test"]]
    assert len(entries) > 30
    for image, captions, scene in entries:
        colors = {o["color"] for o in scene["objects"]}
        shapes = {o["shape"] for o in scene["objects"]}
        for caption in captions:
            w = set(words(caption))
            assert w & set(COLORS) == colors and w & set(SHAPES) == shapes, (caption, scene)
        pixels = np.asarray(Image.open(root / image).convert("RGB")).astype(int)
        for o in scene["objects"]:
            centre = pixels[o["y"], o["x"]]
            nearest = min(COLORS, key=lambda c: np.abs(np.array(COLORS[c]) - centre).sum())
            assert nearest == o["color"] and np.abs(centre - COLORS[o["color"]]).max() <= 40, (image, o, centre)


def test_relation_words_match_object_positions(corpus):
    _, _, meta = corpus
    checked = 0
    for a in meta["clean"] + meta["test"]:
        objs = a["scene"]["objects"]
        for i, rel, j in a["scene"]["relations"]:
            if rel == "left of":
                assert objs[i]["x"] < objs[j]["x"]
            else:
                assert rel == "above" and objs[i]["y"] < objs[j]["y"]
            checked += 1
    assert checked > 0


def test_vqa_answers_agree_with_the_scene(corpus):
    root, counts, meta = corpus
    annotated = meta["clean"] + meta["val"] + meta["test"]
    scenes = {a["image"]: a["scene"] for a in annotated}
    canonical = {q["question_id"]: q for a in annotated for q in a["questions"]}
    train = json.loads((root / "vqa_train.json").read_text())
    val = json.loads((root / "vqa_val.json").read_text())
    test = json.loads((root / "vqa_test.json").read_text())
    answers = set(json.loads((root / "answer_list.json").read_text()))
    assert len(train) == counts["vqa_train"] == 8 * 5 and len(test) == 6 * 5 and len(val) == counts["vqa_val"] > 0
    assert len({q["question_id"] for q in train + val + test}) == len(train) + len(val) + len(test)
    kinds = set()
    for q in train + val + test:
        assert set(q) == {"question_id", "image", "question", "answer", "dataset", "question_type", "answer_type"}
        assert q["dataset"] == "vqa" and len(q["answer"]) == 10
        truth = canonical[q["question_id"]]
        assert truth["question"] == q["question"] and truth["question_type"] == q["question_type"]
        scene, text, ans = scenes[q["image"]], q["question"], truth["answer"]
        assert ans in answers
        objs = scene["objects"]
        by_shape = {o["shape"]: o for o in objs}
        by_color = {o["color"]: o for o in objs}
        if m := re.fullmatch(r"what color is the (\w+)\?", text):
            kinds.add("color")
            assert ans == (by_shape[m[1]]["color"] if m[1] != "background" else scene["background"]["colors"][0])
        elif m := re.fullmatch(r"what shape is the (\w+) object\?", text):
            kinds.add("shape")
            assert ans == by_color[m[1]]["shape"]
        elif text == "how many objects are there?":
            kinds.add("count")
            assert ans == str(len(objs))
        elif m := re.fullmatch(r"is there an? (\w+)( object)?\?", text):
            kinds.add("exists")
            present = m[1] in (by_color if m[2] else by_shape)
            assert ans == ("yes" if present else "no")
        elif m := re.fullmatch(r"is the (\w+) small or large\?", text):
            assert ans == by_shape[m[1]]["size"]
        elif m := re.fullmatch(r"where is the (\w+) (\w+)\?", text):
            assert ans == by_shape[m[2]]["position"] and by_shape[m[2]]["color"] == m[1]
        elif m := re.fullmatch(r"what shape is (left of|right of|above|below) the (\w+) (\w+)\?", text):
            kinds.add("relation")
            ref, subj = by_shape[m[3]], by_shape[ans]
            dx, dy = subj["x"] - ref["x"], subj["y"] - ref["y"]
            assert {"left of": dx < 0, "right of": dx > 0, "above": dy < 0, "below": dy > 0}[m[1]], (text, scene)
        else:
            raise AssertionError(f"unexpected question {text!r}")
    assert {"color", "shape", "count", "exists"} <= kinds


def test_shards_hold_key_grouped_members_like_img2dataset(corpus):
    root, _, meta = corpus
    pretrain = json.loads((root / "pretrain.json").read_text())
    keys = []
    for shard in sorted((root / "shards").glob("pretrain-*.tar")):
        with tarfile.open(shard) as tar:
            members = tar.getmembers()
            names = [m.name for m in members]
            assert names == sorted(names) and all(m.mtime == 0 and m.uid == 0 for m in members)
            for k in range(0, len(names), 3):
                key = names[k].split(".")[0]
                assert names[k:k + 3] == [f"{key}.jpg", f"{key}.json", f"{key}.txt"] and re.fullmatch(r"\d{9}", key)
                i = int(key)
                txt = tar.extractfile(names[k + 2]).read().decode()
                info = json.loads(tar.extractfile(names[k + 1]).read())
                assert txt == pretrain[i]["caption"] == info["caption"]
                assert info["noise"] == meta["pretrain"][i]["noise"] and info["key"] == key
                assert tar.extractfile(names[k]).read() == (root / pretrain[i]["image"]).read_bytes()
                keys.append(key)
    assert keys == [f"{i:09d}" for i in range(40)]


def test_cli_synth_and_errors(tmp_path, capsys):
    ap = argparse.ArgumentParser(prog="blip")
    add_cli(ap.add_subparsers(dest="command"))
    args = ap.parse_args(["data", "synth", "--out", str(tmp_path / "c"), "--seed", "3", "--train", "10",
                          "--clean", "2", "--val", "2", "--test", "2", "--noise", "0.5", "--image-size", "32",
                          "--shard-size", "4"])
    assert args.func(args) == 0
    line = capsys.readouterr().out.strip()
    assert "\n" not in line and line.startswith("10 web pairs (5 noisy") and "3 shards" in line
    assert json.loads((tmp_path / "c" / "metadata.json").read_text())["params"]["seed"] == 3
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "other").write_text("")
    args = ap.parse_args(["data", "synth", "--out", str(tmp_path / "x")])
    assert args.func(args) == 2 and "blip: error:" in capsys.readouterr().err
    args = ap.parse_args(["data"])
    assert args.func(args) == 2


# -----------------------------------------------------------------------------
# JsonCaptionDataset

def test_json_dataset_mixes_files_and_skips_bad_items(corpus, tmp_path):
    root, _, _ = corpus
    extra = tmp_path / "extra.json"
    good = str(root / "images" / "test" / "00000000.jpg")
    extra.write_text(json.dumps([
        {"image": str(tmp_path / "missing.jpg"), "caption": "a missing image"},
        {"image": good, "caption": "  ...  "},
        {"image": good, "caption": ["Two REFS here!", "the other ref"]},
        {"image": "images/test/00000001.jpg", "caption": "relative to the json folder"},
    ]))
    (tmp_path / "images").symlink_to(root / "images")  # extra.json's folder resolves relative paths
    ds = JsonCaptionDataset([root / "pretrain.json", root / "clean_train.json", extra],
                            transform=EvalTransform(32), max_words=5, prompt="a picture of ")
    assert len(ds) == 40 + 40 + 4
    items = [ds[i] for i in range(len(ds))]
    assert [i for i, x in enumerate(items) if x is None] == [80, 81]
    assert ds.skipped_images == 1 and ds.skipped_texts == 1
    assert items[82]["text"] in ("a picture of two refs here", "a picture of the other ref")
    raw = json.loads((root / "pretrain.json").read_text())[7]["caption"]
    assert items[7]["text"] == "a picture of " + pre_caption(raw, 5) and len(pre_caption(raw, 5).split()) <= 5
    assert items[40]["image_id"] == items[41]["image_id"] != items[45]["image_id"]  # 5 captions per clean image
    batch = collate(items[78:84])
    assert batch["image"].shape == (4, 3, 32, 32) and batch["index"].tolist() == [78, 79, 82, 83]
    assert collate([None, None]) is None
    with pytest.raises(ValueError, match="no \"image\""):
        bad = tmp_path / "bad.json"
        bad.write_text(json.dumps([{"caption": "x"}]))
        JsonCaptionDataset(bad)


def test_json_dataset_train_transform_is_reproducible_per_epoch(corpus):
    root, _, _ = corpus
    ds = JsonCaptionDataset(root / "pretrain.json", transform=TrainTransform(32), image_root=root)
    a, b = ds[3]["image"], ds[3]["image"]
    ds.set_epoch(1)
    c = ds[3]["image"]
    assert torch.equal(a, b) and not torch.equal(a, c)


# -----------------------------------------------------------------------------
# ShardDataset

def test_shard_dataset_streams_the_corpus_in_order(corpus):
    root, _, _ = corpus
    pretrain = json.loads((root / "pretrain.json").read_text())
    ds = ShardDataset(str(root / "shards" / "pretrain-{00000..00002}.tar"), transform=EvalTransform(32))
    items = list(ds)
    assert [x["key"] for x in items] == [f"{i:09d}" for i in range(40)]
    assert [x["text"] for x in items] == [pre_caption(e["caption"], 30) for e in pretrain]
    assert items[0]["image"].shape == (3, 32, 32) and items[0]["meta"]["key"] == "000000000"
    assert ds.stats() == {"samples": 40, "skipped_images": 0, "skipped_texts": 0, "bad_shards": 0, "shards": 3}
    assert expand_shards(root / "shards") == expand_shards(str(root / "shards" / "*.tar")) == ds.shards


def _add(tar, name, data):
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def test_corrupt_images_empty_captions_and_truncated_shards_are_skipped_and_counted(corpus, tmp_path):
    root, _, _ = corpus
    jpeg = (root / "images" / "train" / "00000000.jpg").read_bytes()
    png = io.BytesIO()
    Image.new("RGB", (20, 20), (1, 2, 3)).save(png, format="PNG")
    with tarfile.open(tmp_path / "bad-0.tar", "w") as tar:
        for name, data in [("a.jpg", jpeg), ("a.txt", b"first good one"),
                           ("b.jpg", b"this is not a jpeg"), ("b.txt", b"corrupt image"),
                           ("c.jpg", jpeg), ("c.txt", b"  ...  "),
                           ("d.png", png.getvalue()), ("d.json", b'{"caption": "caption from json"}'),
                           ("e.txt", b"no image at all"),
                           ("f.jpg", jpeg[: len(jpeg) // 2]), ("f.txt", b"truncated image"),
                           ("g.jpg", jpeg), ("g.txt", b"last good one")]:
            _add(tar, name, data)
    shard = (root / "shards" / "pretrain-00000.tar").read_bytes()
    (tmp_path / "bad-1.tar").write_bytes(shard[: len(shard) // 2])  # cut mid-member
    ds = ShardDataset([tmp_path / "bad-0.tar", tmp_path / "bad-1.tar"], transform=EvalTransform(32))
    items = list(ds)
    keys = [x["key"] for x in items]
    assert keys[:3] == ["a", "d", "g"]
    assert [x["text"] for x in items[:3]] == ["first good one", "caption from json", "last good one"]
    assert 0 < len(keys) - 3 < 16  # the samples before the damage in the truncated shard
    assert (ds.skipped_images, ds.skipped_texts, ds.bad_shards) == (3, 1, 1)
    assert items[1]["skipped"] == (1, 1) and items[2]["skipped"] == (2, 0)


def test_ranks_get_disjoint_covering_shards(corpus):
    root, _, _ = corpus
    everything = {f"{i:09d}" for i in range(40)}
    for world in (2, 3):
        parts = [[x["key"] for x in ShardDataset(root / "shards", transform=no_image, shuffle_buffer=4, seed=5,
                                                  rank=r, world_size=world)] for r in range(world)]
        assert all(parts) and sum(len(p) for p in parts) == 40 and set().union(*parts) == everything


def test_order_is_fixed_by_seed_and_epoch(corpus):
    root, _, _ = corpus

    def keys(seed, epoch):
        ds = ShardDataset(root / "shards", transform=no_image, shuffle_buffer=8, seed=seed)
        ds.set_epoch(epoch)
        return [x["key"] for x in ds]

    assert keys(0, 0) == keys(0, 0) != keys(0, 1)
    assert keys(0, 0) != keys(1, 0) and sorted(keys(1, 0)) == sorted(keys(0, 0))


def test_skip_resumes_exactly_where_an_uninterrupted_run_continues(corpus, tmp_path):
    root, _, _ = corpus
    with tarfile.open(tmp_path / "z-bad.tar", "w") as tar:  # bad samples in the middle of the stream
        for name, data in [("x.jpg", b"broken"), ("x.txt", b"broken image"), ("y.jpg", b""), ("y.txt", b"")]:
            _add(tar, name, data)
    shards = sorted((root / "shards").glob("*.tar"))
    shards = shards[:1] + [tmp_path / "z-bad.tar"] + shards[1:]

    def make():
        return ShardDataset(shards, transform=TrainTransform(32), shuffle_buffer=6, seed=1)

    full = list(make())
    assert len(full) == 40
    for n in (0, 13, 39):
        ds = make()
        ds.skip(n)
        tail = list(ds)
        assert [x["key"] for x in tail] == [x["key"] for x in full[n:]]
        assert all(torch.equal(a["image"], b["image"]) for a, b in zip(tail, full[n:]))  # same augmentation
        counted = (ds.skipped_images, ds.skipped_texts)
        assert counted == ((1, 1) if n == 0 else (0, 0) if n == 39 else counted)  # the skipped part was counted before


def test_dataloader_workers_split_count_and_resume_exactly(corpus, tmp_path):
    root, _, _ = corpus
    with tarfile.open(tmp_path / "bad.tar", "w") as tar:
        _add(tar, "q.jpg", b"broken")
        _add(tar, "q.txt", b"a caption")
    shards = sorted((root / "shards").glob("*.tar")) + [tmp_path / "bad.tar"]

    def run(ds, stop=None):
        batches = []
        for batch in DataLoader(ds, batch_size=4, num_workers=2, collate_fn=collate):
            ds.record(batch)
            batches.append(batch["key"])
            if len(batches) == stop:
                break
        return batches

    def make():
        return ShardDataset(shards, transform=EvalTransform(16), shuffle_buffer=5, seed=2)

    ds = make()
    full = run(ds)
    flat = [k for b in full for k in b]
    assert sorted(flat) == [f"{i:09d}" for i in range(40)]
    assert ds.stats()["samples"] == 40 and ds.skipped_images == 1  # counted in a worker, reported via record
    for stop in (3, 9):  # mid-epoch, and after one worker ran out of data
        ds = make()
        head = run(ds, stop)
        resumed = make()
        resumed.load_state_dict(json.loads(json.dumps(ds.state_dict())))
        assert head + run(resumed) == full
    with pytest.raises(ValueError, match="stream"):
        list(resumed)  # the resume state is for 2 workers, this is the main process
    counted = make()
    counted.skip(3 * 4, batch_size=4)  # a loop that only counts samples, before any worker ran out
    assert full[:3] + run(counted) == full


def test_items_are_skipped_not_crashing_with_a_real_dataloader_batch(corpus):
    root, _, _ = corpus
    ds = ShardDataset(root / "shards", image_size=32, shuffle_buffer=4)
    batch = next(iter(DataLoader(ds, batch_size=5, collate_fn=collate)))
    assert batch["image"].shape == (5, 3, 32, 32) and len(batch["text"]) == 5
    assert math.isfinite(batch["image"].abs().sum().item())
