"""The `blip` command: outputs, JSON lines, and bad input as one-line errors."""
import json
import subprocess
import sys

import pytest
import torch
from PIL import Image

from blip.cli import main


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    d = tmp_path_factory.mktemp("imgs")
    for i in range(3):
        Image.new("RGB", (40 + 10 * i, 30), (60 * i, 100, 200)).save(d / f"ok{i}.png")
    (d / "notes.jpg").write_text("this is a text file, not a picture")
    (d / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0" + b"\x00" * 50)  # a JPEG header and nothing else
    return d


def test_caption_folder_skips_bad_images(hf_dirs, images, capsys):
    rc = main(["caption", str(images), "--model", str(hf_dirs["caption"][0]), "--json", "--max-length", "8"])
    out, err = capsys.readouterr()
    rows = [json.loads(line) for line in out.splitlines()]
    assert rc == 1  # some inputs failed, the rest were processed
    assert sorted(r["image"].rsplit("/", 1)[1] for r in rows) == ["ok0.png", "ok1.png", "ok2.png"]
    assert all(r["ids"][0] == 30522 and isinstance(r["caption"], str) for r in rows)
    assert "notes.jpg" in err and "broken.jpg" in err and "Traceback" not in err


def test_caption_glob_plain_output(hf_dirs, images, capsys):
    rc = main(["caption", str(images / "ok*.png"), "--model", str(hf_dirs["caption"][0]), "--num-beams", "1",
               "--max-length", "6"])
    out, _ = capsys.readouterr()
    assert rc == 0 and len(out.splitlines()) == 3 and all("\t" in line for line in out.splitlines())


def test_missing_checkpoint_is_one_line_error():
    r = subprocess.run([sys.executable, "-m", "blip.cli", "caption", "x.png", "--model", "/no/such/ckpt.pth"],
                       capture_output=True, text=True)
    assert r.returncode == 2
    assert r.stderr.strip().count("\n") == 0 and "not found" in r.stderr and "Traceback" not in r.stderr


def test_all_images_bad(hf_dirs, images, capsys):
    rc = main(["caption", str(images / "notes.jpg"), "--model", str(hf_dirs["caption"][0])])
    assert rc == 2 and "could be read" in capsys.readouterr().err


def test_wrong_kind_of_checkpoint_cli(hf_dirs, images, capsys):
    rc = main(["match", str(images / "ok0.png"), "--text", "a dog", "--model", str(hf_dirs["caption"][0])])
    err = capsys.readouterr().err
    assert rc == 2 and "needs a retrieval or pretrained checkpoint" in err


def test_match_vqa_embed_info(hf_dirs, images, capsys, tmp_path):
    img = str(images / "ok0.png")
    assert main(["match", img, "--text", "a dog", "", "--json", "--model", str(hf_dirs["retrieval"][0])]) == 0
    rows = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert len(rows) == 2 and all(0 <= r["itm"] <= 1 and -1 <= r["itc"] <= 1 for r in rows)
    (tmp_path / "answers.json").write_text(json.dumps(["yes", "no", "red"]))
    assert main(["vqa", img, "--question", "is it red?", "--answers", str(tmp_path / "answers.json"),
                 "--json", "--model", str(hf_dirs["vqa"][0])]) == 0
    row = json.loads(capsys.readouterr().out)
    assert row["answer"] in ("yes", "no", "red")
    assert main(["embed", img, "--text", "a dog", "--model", str(hf_dirs["retrieval"][0])]) == 0
    rows = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert len(rows) == 2 and len(rows[0]["embedding"]) == 32 and rows[1]["text"] == "a dog"
    assert main(["info", str(hf_dirs["vqa"][0]), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["task"] == "vqa" and info["parameters"]["total"] > 0


def test_vqa_on_caption_checkpoint_errors(hf_dirs, images, capsys):
    rc = main(["vqa", str(images / "ok0.png"), "--question", "what?", "--model", str(hf_dirs["caption"][0])])
    assert rc == 2 and "needs a VQA checkpoint" in capsys.readouterr().err


@pytest.mark.parametrize("device", ["gpu", "cuda:{n}"])
def test_missing_device_is_one_line_error(hf_dirs, images, capsys, device):
    device = device.format(n=torch.cuda.device_count())  # one past the last GPU
    rc = main(["caption", str(images / "ok0.png"), "--model", str(hf_dirs["caption"][0]), "--device", device])
    err = capsys.readouterr().err
    assert rc == 2 and device in err and err.count("blip: error:") == 1 and "Traceback" not in err


def test_caption_and_embed_same_with_or_without_decoding_threads(hf_dirs, images, capsys):
    outs = {}
    for workers in ("0", "3"):
        args = ["--model", str(hf_dirs["caption"][0]), "--json", "--batch-size", "2", "--workers", workers]
        rc = main(["caption", str(images), "--max-length", "8", *args])
        outs[workers] = capsys.readouterr().out
        assert rc == 1  # the two bad files are skipped either way
    assert outs["0"] == outs["3"] and len(outs["0"].splitlines()) == 3
    embeds = {}
    for workers in ("0", "2"):
        assert main(["embed", str(images / "ok*.png"), "--model", str(hf_dirs["retrieval"][0]),
                     "--batch-size", "2", "--workers", workers]) == 0
        embeds[workers] = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["image"] for r in embeds["0"]] == [r["image"] for r in embeds["2"]] and len(embeds["0"]) == 3
    for a, b in zip(embeds["0"], embeds["2"]):
        assert torch.equal(torch.tensor(a["embedding"]), torch.tensor(b["embedding"]))


@pytest.mark.parametrize("flag", [["--batch-size", "0"], ["--workers", "-1"], ["--batch-size", "two"]])
def test_bad_batching_numbers_are_refused(hf_dirs, images, capsys, flag):
    with pytest.raises(SystemExit) as e:
        main(["caption", str(images / "ok0.png"), "--model", str(hf_dirs["caption"][0]), *flag])
    err = capsys.readouterr().err
    assert e.value.code == 2 and flag[0] in err and "Traceback" not in err


def test_embed_prints_each_batch_as_it_is_done(hf_dirs, images, capsys, monkeypatch):
    """An interrupted `blip embed` keeps the lines of the batches already done (they used to be
    printed only at the very end)."""
    from blip.model import Blip
    real, calls = Blip.embed_images, []

    def interrupted_on_the_second_batch(self, *a, **kw):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(self, *a, **kw)

    monkeypatch.setattr(Blip, "embed_images", interrupted_on_the_second_batch)
    rc = main(["embed", str(images / "ok*.png"), "--model", str(hf_dirs["retrieval"][0]), "--batch-size", "1"])
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert rc == 130 and len(rows) == 1 and rows[0]["image"].endswith("ok0.png")
