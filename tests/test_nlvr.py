"""NLVR2: the two-image model, its official checkpoint layout, finetuning and evaluation (tiny models)."""
import json
import random
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import blip
from blip.checkpoint import read_checkpoint, save_official
from blip.cli import main as cli
from blip.config import get_config
from blip.eval import nlvr as nlvr_eval
from blip.model import Blip
from blip.nlvr import BlipNLVR, merge_from, twin_state_dict
from blip.med import TextTransformer
from blip.tokenizer import pre_caption
from blip.train.data import SeededItems
from blip.train.tasks import build_objective
from blip.train.tasks import nlvr as task
from blip.transform import TrainTransform

pytestmark = pytest.mark.usefixtures("one_thread")

COLOURS = {"red": (220, 30, 30), "blue": (30, 30, 220), "green": (30, 200, 30)}


def tiny(**overrides):
    return get_config("tiny", task="nlvr", **overrides)


def write_corpus(root, n=8, name="nlvr_train.json"):
    """n examples: two one-colour 64 px images; "the left image is red" style sentences, labels by truth."""
    root.mkdir(parents=True, exist_ok=True)
    for c, rgb in COLOURS.items():
        Image.new("RGB", (64, 64), rgb).save(root / f"{c}.png")
    rng = random.Random(n)
    entries = []
    for i in range(n):
        a, b = rng.sample(sorted(COLOURS), 2)
        side, said = rng.choice(["left", "right"]), rng.choice(sorted(COLOURS))
        truth = said == (a if side == "left" else b)
        entries.append({"images": [f"{a}.png", f"{b}.png"], "sentence": f"The {side} image is {said}.",
                        "label": str(truth), "identifier": f"ex-{i}"})
    (root / name).write_text(json.dumps(entries))
    return root / name


def official_nlvr_keys(depth, vision_depth):
    """The official BLIP_NLVR state-dict names (models/blip_nlvr.py + nlvr_encoder.py), written out by hand:
    merge_layer in layers >= 6 (hard-coded there), cls_head = Sequential(Linear, ReLU, Linear)."""
    keys = ["visual_encoder.cls_token", "visual_encoder.pos_embed", "visual_encoder.patch_embed.proj.weight",
            "visual_encoder.patch_embed.proj.bias", "visual_encoder.norm.weight", "visual_encoder.norm.bias"]
    for i in range(vision_depth):
        for m in ("norm1", "attn.qkv", "attn.proj", "norm2", "mlp.fc1", "mlp.fc2"):
            keys += [f"visual_encoder.blocks.{i}.{m}.weight", f"visual_encoder.blocks.{i}.{m}.bias"]
    keys += ["text_encoder.embeddings.position_ids", "text_encoder.embeddings.word_embeddings.weight",
             "text_encoder.embeddings.position_embeddings.weight", "text_encoder.embeddings.LayerNorm.weight",
             "text_encoder.embeddings.LayerNorm.bias"]
    for i in range(depth):
        p = f"text_encoder.encoder.layer.{i}."
        mods = ["attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense",
                "attention.output.LayerNorm", "crossattention.self0.query", "crossattention.self0.key",
                "crossattention.self0.value", "crossattention.self1.query", "crossattention.self1.key",
                "crossattention.self1.value", "crossattention.output.dense0", "crossattention.output.dense1",
                "crossattention.output.LayerNorm", "intermediate.dense", "output.dense", "output.LayerNorm"]
        if i >= 6:
            mods.append("crossattention.output.merge_layer")
        keys += [p + m + s for m in mods for s in (".weight", ".bias")]
    return keys + ["cls_head.0.weight", "cls_head.0.bias", "cls_head.2.weight", "cls_head.2.bias"]


def official_shape(key, w, vw, ffn, vocab, positions, patch, grid):
    if key == "text_encoder.embeddings.position_ids":
        return (1, positions)
    shapes = {"cls_token": (1, 1, vw), "pos_embed": (1, grid * grid + 1, vw),
              "patch_embed.proj.weight": (vw, 3, patch, patch), "patch_embed.proj.bias": (vw,),
              "attn.qkv.weight": (3 * vw, vw), "attn.qkv.bias": (3 * vw,), "attn.proj.weight": (vw, vw),
              "mlp.fc1.weight": (4 * vw, vw), "mlp.fc1.bias": (4 * vw,), "mlp.fc2.weight": (vw, 4 * vw),
              "word_embeddings.weight": (vocab, w), "position_embeddings.weight": (positions, w),
              "crossattention.self0.key.weight": (w, vw), "crossattention.self1.key.weight": (w, vw),
              "crossattention.self0.value.weight": (w, vw), "crossattention.self1.value.weight": (w, vw),
              "intermediate.dense.weight": (ffn, w), "intermediate.dense.bias": (ffn,),
              "output.dense.weight": (w, ffn), "merge_layer.weight": (w, 2 * w), "cls_head.2.weight": (2, w),
              "cls_head.2.bias": (2,)}
    for suffix, shape in shapes.items():
        if key.endswith(suffix) and not (suffix == "output.dense.weight" and "attention" in key):
            return shape
    if key.startswith("visual_encoder."):
        return (vw, vw) if key.endswith("weight") and "norm" not in key else (vw,)
    return (w, w) if key.endswith("weight") and "LayerNorm" not in key else (w,)


# ----------------------------------------------------------------------------- model
def test_shapes_and_inference_api(tmp_path):
    model = blip.create_model("tiny", task="nlvr").eval()
    assert isinstance(model, BlipNLVR)
    ids, mask = model.tokenize(["the left image has a dog", "two dogs"])
    assert (ids[:, 0] == 30523).all()  # [ENC] first
    logits = model(torch.randn(2, 2, 3, 64, 64), ids, mask)
    assert logits.shape == (2, 2)
    root = tmp_path / "imgs"
    write_corpus(root, 2)
    paths0, paths1 = [str(root / "red.png"), str(root / "blue.png")], [str(root / "green.png")] * 2
    direct = model.logits(paths0, paths1, ["a red one", "a blue one"])
    assert torch.allclose(direct, model.logits(model.pixels(paths0), model.pixels(paths1), ["a red one", "a blue one"]))
    assert model.predict(paths0, paths1, ["a red one", "a blue one"], batch_size=1) == direct.argmax(-1).bool().tolist()
    with pytest.raises(ValueError, match="one sentence per pair"):
        model.logits(paths0, paths1, ["one"])
    with pytest.raises(ValueError, match=r"\(B, 2, 3, H, W\)"):
        model(torch.randn(2, 3, 64, 64), ids, mask)


def test_merging_layers_are_the_second_half():
    assert [merge_from(d) for d in (12, 4, 2, 1)] == [6, 2, 1, 0]
    model = BlipNLVR(tiny(**{"text.depth": 4}))
    merging = [hasattr(layer.crossattention.output, "merge_layer") for layer in model.text_encoder.layers]
    assert merging == [False, False, True, True]


@torch.no_grad()
def test_twin_cross_attention_equals_the_single_one_for_one_image_twice():
    """Duplicated weights and the same image twice: averaging layers give the one-image encoder's states, and
    a merge layer [I/2, I/2] (bias 0) does too, so the whole NLVR encoder matches the feature model's."""
    torch.manual_seed(0)
    single = Blip(get_config("tiny", task="feature", **{"text.depth": 4})).eval()
    cfg = tiny(**{"text.depth": 4})
    images = torch.randn(3, 3, 64, 64)
    ids, mask = single.tokenizer(["a red square left of a ring", "two", "blue dots on the right"], first_token=30523)
    states = single.visual_encoder(images)
    want = single.text_encoder(ids, mask, states, mode="multimodal")
    text_sd = {k[len("text_encoder."):]: v for k, v in twin_state_dict(single.state_dict()).items()
               if k.startswith("text_encoder.")}
    averaging = TextTransformer(cfg.text, cfg.cross_width, twin_merge_from=cfg.text.depth).eval()  # no merge layer
    averaging.load_state_dict(text_sd)
    assert torch.allclose(averaging(ids, mask, (states, states), mode="multimodal"), want, atol=1e-5)

    model = BlipNLVR(cfg).eval()
    report = blip.checkpoint.load_into(model, twin_state_dict(single.state_dict()), strict=False)
    assert report.loaded == len(text_sd) + len(single.visual_encoder.state_dict())
    eye = torch.eye(cfg.text.width) / 2
    for layer in model.text_encoder.layers[merge_from(4):]:
        layer.crossattention.output.merge_layer.weight.copy_(torch.cat([eye, eye], 1))
        layer.crossattention.output.merge_layer.bias.zero_()
    got = model.text_encoder(ids, mask, (states, states), mode="multimodal")
    assert torch.allclose(got, want, atol=1e-5)
    other = model.text_encoder(ids, mask, (states, states.flip(0)), mode="multimodal")
    assert not torch.allclose(other, want, atol=1e-3)  # the second branch does read the second image


def test_official_layout_checkpoint_loads_strictly(tmp_path):
    """A hand-written checkpoint in the official BLIP_NLVR layout, 12 text layers (merge_layer in 6-11)."""
    w, vw, ffn, vocab, positions, patch, grid, vdepth = 64, 48, 128, 30524, 40, 16, 2, 2
    keys = official_nlvr_keys(12, vdepth)
    g = torch.Generator().manual_seed(0)
    sd = {k: torch.arange(positions).unsqueeze(0) if k.endswith("position_ids")
          else torch.randn(official_shape(k, w, vw, ffn, vocab, positions, patch, grid), generator=g) * 0.02
          for k in keys}
    path = tmp_path / "model_base_nlvr.pth"
    torch.save({"model": sd}, path)
    config, _ = read_checkpoint(path)
    assert config.task == "nlvr" and config.text.depth == 12 and config.vision.width == vw
    assert config.cross_width == vw and config.vision.image_size == grid * patch
    model = blip.load(path)  # strict
    assert isinstance(model, BlipNLVR) and model.load_report.loaded == len(keys) - 1  # position_ids is a buffer we lack
    own = model.state_dict()
    assert set(own) == set(keys) - {"text_encoder.embeddings.position_ids"}
    assert all(torch.equal(own[k], sd[k]) for k in own)
    assert model.predict(torch.randn(1, 3, 32, 32), torch.randn(1, 3, 32, 32), "x") in ([True], [False])
    assert cli(["info", str(path), "--json"]) == 0


def test_adapt_state_dict_duplicates_a_pretrained_cross_attention(tmp_path):
    from blip.train.init_weights import load_init
    pre = blip.create_model("tiny", task="pretrain")
    sd = {k: v.clone() for k, v in pre.state_dict().items()}
    model = task.build_model(tiny())
    merge_before = model.text_encoder.layers[1].crossattention.output.merge_layer.weight.clone()
    head_before = model.cls_head[0].weight.clone()
    report = load_init(model, sd, adapt=task.adapt_state_dict)
    own = model.state_dict()
    for i in range(2):
        p = f"text_encoder.encoder.layer.{i}.crossattention."
        for b in "01":
            for m in ("query", "key", "value"):
                assert torch.equal(own[f"{p}self{b}.{m}.weight"], sd[f"{p}self.{m}.weight"])
            assert torch.equal(own[f"{p}output.dense{b}.bias"], sd[f"{p}output.dense.bias"])
        assert torch.equal(own[f"{p}output.LayerNorm.weight"], sd[f"{p}output.LayerNorm.weight"])
    assert own["text_encoder.encoder.layer.0.crossattention.self0.query.weight"].data_ptr() != \
        own["text_encoder.encoder.layer.0.crossattention.self1.query.weight"].data_ptr()
    assert torch.equal(model.text_encoder.layers[1].crossattention.output.merge_layer.weight, merge_before)
    assert torch.equal(model.cls_head[0].weight, head_before)
    assert sorted({k.split(".")[0] for k in report["missing"]}) == ["cls_head", "text_encoder"]
    assert all("merge_layer" in k for k in report["missing"] if k.startswith("text_encoder"))
    nlvr_sd = model.state_dict()
    assert task.adapt_state_dict(nlvr_sd, model) is nlvr_sd  # an NLVR checkpoint passes through
    # blip.load does the same for a one-image checkpoint asked to be an NLVR model (non-strict: new head)
    path = save_official(pre, tmp_path / "pre.pth")
    loaded = blip.load(path, task="nlvr", strict=False)
    assert torch.equal(loaded.state_dict()["text_encoder.encoder.layer.1.crossattention.self1.key.weight"],
                       sd["text_encoder.encoder.layer.1.crossattention.self.key.weight"])


# ----------------------------------------------------------------------------- training pieces
def test_objective_is_cross_entropy_of_the_head():
    torch.manual_seed(0)
    model = BlipNLVR(tiny()).eval()  # no dropout: the same forward twice
    batch = {"image": torch.randn(4, 2, 3, 64, 64), "text": ["a", "the left one is red", "b", "c"],
             "label": torch.tensor([0, 1, 1, 0])}
    out = build_objective("nlvr", model)(batch)
    logits = model(batch["image"], *model.tokenize(batch["text"]))
    assert torch.allclose(out["loss"], F.cross_entropy(logits, batch["label"]))
    assert out["acc"] == (logits.argmax(-1) == batch["label"]).float().mean()
    out["loss"].backward()
    assert model.text_encoder.layers[1].crossattention.output.merge_layer.weight.grad.abs().sum() > 0


def test_swap_rule():
    assert task.swap_pair(("a", "b"), "the left dog", 0.3) == (("a", "b"), "the left dog")
    assert task.swap_pair(("a", "b"), "the left dog is right of a leftover", 0.7) == \
        (("b", "a"), "the right dog is left of a leftover")
    assert task.swap_pair(("a", "b"), "two dogs", 0.5) == (("b", "a"), "two dogs")


def test_dataset_swaps_half_the_pairs_reproducibly(tmp_path):
    path = write_corpus(tmp_path, 40)
    transform = TrainTransform(64, min_scale=1.0, randaugment=False, hflip=False)  # images as they are
    ds = task.NLVRDataset(str(path), transform=transform)
    items = SeededItems(ds, seed=3)
    swapped = 0
    for i, e in enumerate(ds.examples):
        item = items[i]
        first, second = (transform(p, generator=0) for p in e.images)
        kept = torch.equal(item["image"][0], first) and torch.equal(item["image"][1], second)
        assert kept or (torch.equal(item["image"][0], second) and torch.equal(item["image"][1], first))
        clean = pre_caption(e.sentence, 40)
        flipped = " ".join({"left": "right", "right": "left"}.get(w, w) for w in clean.split(" "))
        assert item["text"] == (clean if kept else flipped) and item["label"] == int(e.label)
        swapped += not kept
        assert torch.equal(items[i]["image"], item["image"]) and items[i]["text"] == item["text"]  # same draw
    assert 10 <= swapped <= 30
    batch = task.collate(None)([items[0], items[1]])
    assert batch["image"].shape == (2, 2, 3, 64, 64) and batch["label"].dtype == torch.long
    assert batch["text"] == [items[0]["text"], items[1]["text"]]


def test_bad_annotations_are_one_clear_error(tmp_path):
    caption_file = tmp_path / "captions.json"
    caption_file.write_text(json.dumps([{"image": "a.png", "caption": "a dog"}]))
    with pytest.raises(ValueError, match="entry 0 is not an NLVR2 example.*caption"):
        nlvr_eval.load_annotation(caption_file)
    path = write_corpus(tmp_path / "c", 2)
    entries = json.loads(path.read_text())
    entries[1]["images"][1] = "nowhere.png"
    path.write_text(json.dumps(entries))
    with pytest.raises(ValueError, match="entry 1: image not found: .*nowhere.png"):
        nlvr_eval.load_annotation(path)
    entries[1]["images"][1], entries[1]["label"] = "red.png", "maybe"
    path.write_text(json.dumps(entries))
    with pytest.raises(ValueError, match="entry 1 has label 'maybe'"):
        nlvr_eval.load_annotation(path)
    with pytest.raises(FileNotFoundError, match="not found"):
        nlvr_eval.load_annotation(tmp_path / "missing.json")


# ----------------------------------------------------------------------------- CLI end to end
def test_finetune_then_evaluate_end_to_end(tmp_path, capsys):
    data = tmp_path / "data"
    train = write_corpus(data, 8)
    dev = write_corpus(data, 6, "nlvr_dev.json")
    init = tmp_path / "pre.pth"
    save_official(blip.create_model("tiny", task="pretrain"), init)
    cfg = {"task": "nlvr", "model": "tiny", "train_files": [str(train)], "val_file": str(dev), "test_file": str(dev),
           "image_size": 64, "min_scale": 0.5, "batch_size": 4, "epochs": 1, "schedule": "cosine", "init_lr": 1e-4,
           "min_lr": 0.0, "log_interval": 1, "progress": False}
    (tmp_path / "cfg.json").write_text(json.dumps(cfg))
    out = tmp_path / "run"
    assert cli(["finetune", "--task", "nlvr", "--config", str(tmp_path / "cfg.json"), "--out", str(out),
                "--init", str(init), "--no-progress"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["global_step"] == 2 and result["best"]["epoch"] == 0
    best = json.loads((out / "best.json").read_text())
    assert best["rule"] == nlvr_eval.RULE and best["metrics"]["n"] == 6
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert {"loss", "loss_nlvr", "acc"} <= set(log[0])
    config = json.loads((out / "model" / "config.json").read_text())
    assert config["format"] == "blip" and config["task"] == "nlvr"
    model = blip.load(out / "model")
    assert isinstance(model, BlipNLVR)
    examples = nlvr_eval.load_annotation(dev)
    preds = model.predict([e.images[0] for e in examples], [e.images[1] for e in examples],
                          [e.sentence for e in examples])
    want = 100.0 * sum(p == e.label for p, e in zip(preds, examples)) / len(examples)
    assert best["score"] == pytest.approx(want) and result["test"]["acc"] == pytest.approx(want)
    # the CLI evaluation of the exported model gives the same accuracy and writes the predictions
    assert cli(["evaluate", "--task", "nlvr", "--model", str(out / "model"), "--data", str(dev), "--json",
                "--quiet", "--out", str(tmp_path / "eval")]) == 0
    metrics = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert metrics == {"acc": pytest.approx(want), "n": 6}
    rows = json.loads((tmp_path / "eval" / "nlvr_predictions.json").read_text())
    assert [r["prediction"] == "True" for r in rows] == preds and rows[0]["identifier"] == "ex-0"


def test_cli_bad_input_exits_2_with_one_line(tmp_path, capsys):
    data = tmp_path / "data"
    dev = write_corpus(data, 2, "nlvr_dev.json")
    model_dir = blip.checkpoint.save_blip(blip.create_model("tiny", task="nlvr"), tmp_path / "m")
    caption_file = data / "captions.json"
    caption_file.write_text(json.dumps([{"image": "red.png", "caption": "red"}]))
    cfg = tmp_path / "cfg.json"
    cfg.write_text(json.dumps({"task": "nlvr", "model": "tiny", "train_files": [str(caption_file)], "batch_size": 1,
                               "progress": False}))
    runs = [["evaluate", "--task", "nlvr", "--model", str(model_dir), "--data", str(caption_file)],
            ["finetune", "--task", "nlvr", "--config", str(cfg), "--out", str(tmp_path / "r1")],
            ["evaluate", "--task", "nlvr", "--model", str(model_dir), "--data", str(tmp_path / "none.json")]]
    entries = json.loads(dev.read_text())
    entries[0]["images"][0] = "gone.png"
    dev.write_text(json.dumps(entries))
    runs.append(["evaluate", "--task", "nlvr", "--model", str(model_dir), "--data", str(dev)])
    pretrained = save_official(blip.create_model("tiny", task="pretrain"), tmp_path / "pre.pth")
    runs.append(["evaluate", "--task", "nlvr", "--model", str(pretrained), "--data", str(caption_file)])
    runs.append(["caption", "--model", str(model_dir), str(data / "red.png")])  # not a captioner
    for argv in runs:
        assert cli(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("blip: error: "), err


def test_configs_follow_the_official_recipe():
    from blip.train.config import TrainConfig
    configs = Path(__file__).parent.parent / "configs"
    cfg = TrainConfig.load(configs / "nlvr.json")
    assert (cfg.task, cfg.init, cfg.image_size, cfg.batch_size, cfg.init_lr, cfg.min_lr, cfg.epochs, cfg.schedule,
            cfg.weight_decay, cfg.min_scale) == ("nlvr", "model_base", 384, 16, 3e-5, 0.0, 15, "cosine", 0.05, 0.5)
    assert cfg.model_config().vision.drop_path == 0.1 and cfg.val_file.endswith("nlvr_dev.json")
    synthetic = TrainConfig.load(configs / "nlvr_synthetic.json")
    assert synthetic.task == "nlvr" and synthetic.train_files == ["runs/synthetic/nlvr_train.json"]
