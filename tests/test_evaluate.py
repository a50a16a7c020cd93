"""Retrieval metrics, by hand and end to end on a tiny model."""
import json

import torch
from PIL import Image

import blip
from blip.evaluate import evaluate_retrieval, recall_at_k


def test_recall_at_k_by_hand():
    # 3 images, 4 texts; image 0 owns texts 0 and 1, image 1 owns text 2, image 2 owns text 3
    txt2img, img2txt = [0, 0, 1, 2], [[0, 1], [2], [3]]
    i2t = torch.tensor([[0.1, 0.9, 0.0, 0.0],    # best caption (1) is its own: rank 0
                        [0.9, 0.0, 0.5, 0.0],    # own text 2 at rank 1
                        [0.9, 0.8, 0.7, 0.1]])   # own text 3 at rank 3
    t2i = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    r = recall_at_k(i2t, t2i, txt2img, img2txt)
    assert abs(r["tr@1"] - 100 / 3) < 1e-4 and abs(r["tr@5"] - 100) < 1e-4
    assert abs(r["ir@1"] - 75) < 1e-4
    assert abs(r["chance_ir@1"] - 100 / 3) < 1e-4


def test_evaluate_retrieval_end_to_end(hf_dirs, tmp_path):
    model = blip.load(hf_dirs["retrieval"][0])
    entries = []
    for i in range(4):
        Image.new("RGB", (40, 40), (60 * i, 30, 200 - 40 * i)).save(tmp_path / f"{i}.png")
        entries.append({"image": f"{i}.png", "caption": [f"a picture number {i}", f"image {i}"]})
    (tmp_path / "test.json").write_text(json.dumps(entries))
    itc = evaluate_retrieval(model, tmp_path / "test.json")
    itm = evaluate_retrieval(model, tmp_path / "test.json", k_test=3)
    for r in (itc, itm):
        assert set(r) >= {"tr@1", "ir@1", "tr@10", "r_mean"} and 0 <= r["ir@1"] <= 100
        assert r["ir@10"] == 100.0  # only 4 images


def test_evaluate_cli(hf_dirs, tmp_path, capsys):
    import json as _json
    from blip.cli import main
    entries = []
    for i in range(3):
        Image.new("RGB", (30, 30), (80 * i, 20, 20)).save(tmp_path / f"{i}.png")
        entries.append({"image": f"{i}.png", "caption": [f"picture {i}"]})
    (tmp_path / "t.json").write_text(_json.dumps(entries))
    assert main(["evaluate", str(tmp_path / "t.json"), "--model", str(hf_dirs["retrieval"][0]), "--json",
                 "--quiet"]) == 0
    out = _json.loads(capsys.readouterr().out)
    assert out["ir@5"] == 100.0 and 0 <= out["tr@1"] <= 100
