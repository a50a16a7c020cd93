"""Captioning finetuning and evaluation (train/tasks/caption.py, eval/caption.py): the objective against a
direct computation, `blip finetune --task caption` end to end with validation, exact resume, `blip evaluate
--task caption`, the metrics against pycocoevalcap's own pipeline, and bad input."""
import json

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import blip
from blip.cli import main
from blip.eval import caption as ecap
from blip.tokenizer import DEC_ID
from blip.train.config import TrainConfig
from blip.train.loop import Trainer
from blip.train import build_objective  # the public name (blip.train.tasks holds it)

pytestmark = pytest.mark.usefixtures("one_thread")

COLORS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220), "yellow": (230, 220, 30)}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Four one-colour images; train.json in the karpathy train format (one entry per caption), val.json in
    the karpathy val/test format (a list of references per image)."""
    root = tmp_path_factory.mktemp("caption_data")
    (root / "img").mkdir()
    train, val = [], []
    for i, (name, rgb) in enumerate(COLORS.items()):
        Image.new("RGB", (40, 40), rgb).save(root / "img" / f"pic_{i:03d}.png")
        caps = [f"A {name} square.", f"a plain {name} picture"]
        train += [{"image": f"img/pic_{i:03d}.png", "caption": c, "image_id": f"pic{i}"} for c in caps]
        val.append({"image": f"img/pic_{i:03d}.png", "caption": caps})
    (root / "train.json").write_text(json.dumps(train))
    (root / "val.json").write_text(json.dumps(val))
    return root


def tiny_args(data, *extra):
    return ["model=tiny", f"train_files=[\"{data / 'train.json'}\"]", "batch_size=4", "max_length=40",
            "schedule=cosine", "init_lr=1e-3", "min_lr=0", "log_interval=1", "ckpt_interval=0", "progress=false",
            "device=cpu", "seed=5", *extra]


def test_objective_equals_the_official_decoder_loss_computed_directly():
    torch.manual_seed(0)
    model = blip.create_model("tiny", task="caption").eval()  # no dropout: two computations must agree
    objective = build_objective("caption", model, prompt="a picture of ", label_smoothing=0.1, max_length=40)
    images = torch.randn(3, 3, 64, 64)
    captions = ["a dog on a mat", "two cats", "a red car parked by a big tree near a house"]
    out = objective({"image": images, "text": captions})

    # BLIP_Decoder.forward: prompt + caption, [DEC] first, targets -100 on pads and on the first
    # len(tokenizer(prompt)) - 1 positions, then BertLMHeadModel's shifted, smoothed, mean cross-entropy
    ids, mask = model.tokenizer(["a picture of " + c for c in captions], max_length=40)
    ids[:, 0] = DEC_ID
    prompt_length = len(model.tokenizer.encode("a picture of ")) - 1
    assert prompt_length == 4
    targets = ids.masked_fill(mask == 0, -100)
    targets[:, :prompt_length] = -100
    logits = model.text_decoder(ids, mask, model.visual_encoder(images))
    expected = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), targets[:, 1:].reshape(-1),
                               ignore_index=-100, label_smoothing=0.1)
    assert torch.allclose(out["loss"], expected, atol=1e-5), (out["loss"], expected)
    assert set(out) == {"loss", "loss_lm"} and model.config.prompt == "a picture of "
    # the prompt's tokens are no targets: only the caption's words and its [SEP] are learnt
    n_caption = sum(len(model.tokenizer.encode(c)) - 1 for c in captions)
    assert int((targets[:, 1:] != -100).sum()) == n_caption
    out["loss"].backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_finetune_validates_exports_the_best_model_and_the_cli_evaluates_it(data, tmp_path, capsys):
    out = tmp_path / "run"
    # METEOR (a Java start of several seconds) is left to the `blip evaluate` call below
    args = tiny_args(data, f"val_file={data / 'val.json'}", "epochs=1",
                     'eval_options={"scorers": ["bleu", "rouge", "cider"], "batch_size": 2}')
    assert main(["finetune", "--task", "caption", "--out", str(out), "--no-progress", *args]) == 0
    rows = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [1, 2]  # 8 captions, 4 a batch
    val = [r for r in rows if "val" in r]
    assert len(val) == 1 and {"Bleu_4", "CIDEr", "ROUGE_L"} <= set(val[0]["val"])
    best = json.loads((out / "best.json").read_text())
    assert best["epoch"] == 0 and best["score"] == pytest.approx(best["metrics"]["CIDEr"] + best["metrics"]["Bleu_4"])
    assert "CIDEr + BLEU-4" in best["rule"]
    results = json.loads((out / "val" / "epoch0" / "captions.json").read_text())
    assert [r["image_id"] for r in results] == [0, 1, 2, 3]  # the numbers ending the file names (official rule)
    model = blip.load(out / "model")
    assert model.config.task == "caption" and model.config.prompt == "a picture of "
    capsys.readouterr()

    assert main(["evaluate", "--task", "caption", "--model", str(out / "model"), "--data", str(data / "val.json"),
                 "--out", str(tmp_path / "eval"), "--json", "--quiet", "--device", "cpu",
                 "--scorers", "bleu,rouge,cider,spice"]) == 0
    metrics = json.loads(capsys.readouterr().out)
    assert {"Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "ROUGE_L", "CIDEr", "SPICE"} <= set(metrics)
    assert metrics["Bleu_4"] + metrics["CIDEr"] == pytest.approx(best["score"]) and metrics["images"] == 4
    assert isinstance(metrics["SPICE"], float) or metrics["SPICE"].startswith("skipped: ")
    written = json.loads((tmp_path / "eval" / "captions.json").read_text())
    assert written == results  # the exported best model, the same beams


@pytest.mark.slow
def test_default_scorers_include_meteor(data):
    """METEOR's Java start (loading its paraphrase table) takes 10 s of CPU or more, hence slow."""
    torch.manual_seed(0)
    model = blip.create_model("tiny", task="caption")
    metrics = ecap.evaluate(model, data / "val.json")
    assert 0 <= metrics["METEOR"] <= 1 and set(ecap.SCORERS) == {"bleu", "meteor", "rouge", "cider", "spice"}
    assert isinstance(metrics["SPICE"], float) or metrics["SPICE"].startswith("skipped: ")


def test_stop_and_resume_equals_an_uninterrupted_run(data, tmp_path):
    cfg = TrainConfig.load(None, tiny_args(data, "task=caption", "epochs=2", "batch_size=2"))  # 4 steps/epoch
    full = Trainer(cfg, tmp_path / "full")
    assert full.train()["global_step"] == 8
    args = ["finetune", "--task", "caption", "--no-progress", *tiny_args(data, "epochs=2", "batch_size=2")]
    assert main([*args, "max_steps=5", "--out", str(tmp_path / "a")]) == 0
    assert main([*args, "max_steps=0", "--resume", str(tmp_path / "a" / "checkpoint.pt"),
                 "--out", str(tmp_path / "b")]) == 0
    resumed = torch.load(tmp_path / "b" / "checkpoint.pt", weights_only=True)
    assert resumed["progress"]["global_step"] == 8
    expected = full.state()["model"]
    assert expected.keys() == resumed["model"].keys()
    assert [k for k in expected if not torch.equal(expected[k], resumed["model"][k])] == []


def test_metrics_equal_pycocoevalcaps_own_tokenizer_and_scorers():
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer
    refs = {7: ["A man rides a horse.", "Someone on a brown horse!"], 9: ["Two dogs, playing.", "dogs at play"],
            3: ["a red car", "A car (red) parked."]}
    preds = {7: "a man riding a horse", 9: "two dogs play", 3: "a parked red car."}
    ours = ecap.caption_metrics(refs, preds, scorers=("bleu", "rouge", "cider"))
    tok = PTBTokenizer()
    gts = tok.tokenize({i: [{"caption": c} for c in refs[i]] for i in refs})
    res = tok.tokenize({i: [{"caption": preds[i]}] for i in preds})
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    assert [ours[f"Bleu_{n}"] for n in (1, 2, 3, 4)] == pytest.approx(bleu)
    assert ours["ROUGE_L"] == pytest.approx(Rouge().compute_score(gts, res)[0])
    assert ours["CIDEr"] == pytest.approx(Cider().compute_score(gts, res)[0])
    assert ecap.score(ours) == ours["CIDEr"] + ours["Bleu_4"]


def test_image_ids_follow_the_official_rule_and_a_gt_file_must_cover_them(tmp_path):
    for name in ("COCO_val2014_000000391895.jpg", "COCO_val2014_000000000042.jpg", "photo.jpg"):
        Image.new("RGB", (8, 8)).save(tmp_path / name)
    coco = [{"image": "COCO_val2014_000000391895.jpg", "caption": ["a"]},
            {"image": "COCO_val2014_000000000042.jpg", "caption": ["b"]}]
    assert [im["image_id"] for im in ecap.load_caption_annotation(coco, tmp_path)] == [391895, 42]
    mixed = coco + [{"image": "photo.jpg", "caption": "c"}, {"image": "photo.jpg", "caption": "d"}]
    images = ecap.load_caption_annotation(mixed, tmp_path)
    assert [(im["image_id"], im["refs"]) for im in images] == [(0, ["a"]), (1, ["b"]), (2, ["c", "d"])]
    own = [dict(e, image_id=f"id{k}") for k, e in enumerate(coco)]
    assert [im["image_id"] for im in ecap.load_caption_annotation(own, tmp_path)] == ["id0", "id1"]
    gt = tmp_path / "gt.json"
    gt.write_text(json.dumps({"images": [{"id": 391895}], "annotations": [{"image_id": 391895, "caption": "x"}]}))
    (tmp_path / "test.json").write_text(json.dumps(coco))
    with pytest.raises(ValueError, match="no references for image_id 42"):
        ecap.checked_annotation(tmp_path / "test.json", gt=gt)
    images, refs = ecap.checked_annotation(tmp_path / "test.json", gt={"other.json": str(gt)})
    assert refs == {391895: ["a"], 42: ["b"]}  # no gt for this file: its own references


def error_lines(capsys):
    err = capsys.readouterr().err.strip().splitlines()
    return [line for line in err if line.startswith("blip: error:")], err


def test_bad_input_is_one_error_line_and_exit_2(data, tmp_path, capsys):
    vqa = tmp_path / "vqa.json"
    vqa.write_text(json.dumps([{"image": "img/pic_000.png", "question": "what colour?", "answer": ["red"]}]))
    missing = tmp_path / "missing.json"
    missing.write_text(json.dumps([{"image": "img/nowhere.png", "caption": "a red square"}]))
    cases = [
        (["finetune", "--task", "caption", "model=tiny", f"train_files=[\"{tmp_path / 'absent.json'}\"]"], "absent.json"),
        (["finetune", "--task", "caption", "model=tiny", f"train_files=[\"{vqa}\"]", f"image_root={data}"], "VQA"),
        (["finetune", "--task", "caption", "model=tiny", f"train_files=[\"{missing}\"]", f"image_root={data}"],
         "nowhere.png"),
        (["finetune", "--task", "caption", *tiny_args(data, f"val_file={vqa}", f"image_root={data}")], "VQA"),
        (["evaluate", "--task", "caption", "--model", "tiny", "--data", str(vqa), "--image-root", str(data)], "VQA"),
        (["evaluate", "--task", "caption", "--model", "tiny", "--data", str(missing), "--image-root", str(data)],
         "nowhere.png"),
    ]
    for argv, needle in cases:
        assert main([*argv, "--out", str(tmp_path / "out")] if argv[0] == "finetune" else argv) == 2, argv
        errors, err = error_lines(capsys)
        assert len(errors) == 1 and needle in errors[0], err
        assert "Traceback" not in "\n".join(err)


def test_shipped_configs_load_with_the_official_settings():
    from pathlib import Path
    root = Path(__file__).resolve().parents[1] / "configs"
    coco = TrainConfig.load(root / "caption_coco.json")
    assert (coco.task, coco.init, coco.batch_size, coco.init_lr, coco.min_lr, coco.epochs, coco.schedule,
            coco.weight_decay, coco.image_size, coco.min_scale, coco.max_length) == \
        ("caption", "model_base_capfilt_large", 32, 1e-5, 0.0, 5, "cosine", 0.05, 384, 0.5, 40)
    assert {k: coco.eval_options[k] for k in ("num_beams", "max_length", "min_length")} == \
        {"num_beams": 3, "max_length": 20, "min_length": 5}
    synthetic = TrainConfig.load(root / "caption_synthetic.json")
    assert synthetic.task == "caption" and synthetic.model_config().vision.image_size == 64
