"""VQA finetuning and evaluation: the loss against a direct computation, answer weights, the official
VQA accuracy (normalisation, leave-one-out averaging), `blip finetune --task vqa` and
`blip evaluate --task vqa` end to end, and bad input."""
import json

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import blip
from blip.cli import main
from blip.eval import vqa as vqa_eval
from blip.eval.vqa_normalize import normalize_answer, process_punctuation, vqa_accuracy
from blip.tokenizer import DEC_ID, ENC_ID
from blip.train.tasks import build_objective
from blip.train.tasks import vqa as task

pytestmark = pytest.mark.usefixtures("one_thread")


# ------------------------------------------------------------------------------ loss
def test_loss_is_weighted_per_answer_lm_loss_over_repeated_question_states():
    torch.manual_seed(0)
    model = blip.create_model("tiny", task="vqa").eval()  # eval: no dropout, so both passes agree
    objective = build_objective("vqa", model)
    batch = {"image": torch.randn(2, 3, 64, 64), "question": ["what color is the big square", "how many"],
             "answer": ["red", "dark blue", "2"], "weight": torch.tensor([0.6, 0.4, 1.0]), "n": torch.tensor([2, 1])}
    out = objective(batch)
    # direct: each answer decoded alone against its own question's states, loss summed over its tokens
    tok = model.tokenizer
    image_states = model.visual_encoder(batch["image"])
    total = 0.0
    for a, (q, answer) in enumerate(zip([0, 0, 1], batch["answer"])):
        q_ids, q_mask = tok([batch["question"][q]], first_token=ENC_ID)
        states = model.text_encoder(q_ids, q_mask, image_states[q:q + 1], mode="multimodal")
        ids, _ = tok([answer], first_token=DEC_ID)
        logits = model.text_decoder(ids, None, states, None)[0, :-1]
        nll = F.cross_entropy(logits, ids[0, 1:], label_smoothing=0.1, reduction="sum")
        total = total + batch["weight"][a] * nll
    assert torch.allclose(out["loss"], total / 2, atol=1e-4)
    out["loss"].backward()
    assert model.text_encoder.embeddings.word_embeddings.weight.grad is not None


def test_a_few_steps_learn_an_answer_only_the_image_decides():
    torch.manual_seed(0)
    model = blip.create_model("tiny", task="vqa", **{"vision.image_size": 32})
    objective = build_objective("vqa", model)
    images = torch.zeros(4, 3, 32, 32)
    images[[0, 2], 0], images[[1, 3], 2] = 2.0, 2.0  # red, blue, red, blue; one question for all
    batch = {"image": images, "question": ["what color is it"] * 4, "answer": ["red", "blue", "red", "blue"],
             "weight": torch.ones(4), "n": torch.ones(4, dtype=torch.long)}
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(25):
        objective(batch)["loss"].backward()
        opt.step()
        opt.zero_grad()
    assert model.eval().answer(images, ["what color is it"] * 4, ["red", "blue"]) == ["red", "blue", "red", "blue"]


# ------------------------------------------------------------------------------ data
def test_answer_weights_vqa_counts_over_annotators_and_vg_fixed():
    answers, weights = task.answer_weights({"answer": ["2", "two", "2", "2", "3"], "dataset": "vqa"})
    assert answers == ["2", "two", "3"] and weights == pytest.approx([0.6, 0.2, 0.2])
    assert task.answer_weights({"answer": "white", "dataset": "vg"}) == (["white"], [0.2])


def _files(tmp_path):
    for name in ("a.jpg", "b.jpg"):
        Image.new("RGB", (40, 40), (200, 30, 30) if name == "a.jpg" else (30, 30, 200)).save(tmp_path / name)
    vqa = [{"question_id": 1, "image": "a.jpg", "question": "What color is it?", "answer": ["red"] * 9 + ["pink"],
            "dataset": "vqa"},
           {"question_id": 2, "image": "b.jpg", "question": "What color is it?", "answer": ["blue"] * 10,
            "dataset": "vqa"}]
    (tmp_path / "vqa.json").write_text(json.dumps(vqa))
    (tmp_path / "vg.json").write_text(json.dumps([{"image": "b.jpg", "question": "is it blue?", "answer": "yes",
                                                   "dataset": "vg"}]))
    (tmp_path / "answers.json").write_text(json.dumps(["red", "blue", "pink", "yes"]))
    return tmp_path


def test_dataset_items_and_collate(tmp_path):
    d = task.VqaDataset([_files(tmp_path) / "vqa.json", tmp_path / "vg.json"], image_size=32)
    items = [d[i] for i in range(len(d))]
    assert items[0]["question"] == "what color is it?" and items[0]["answers"] == ["red", "pink"]
    assert items[0]["weights"] == pytest.approx([0.9, 0.1]) and items[2]["weights"] == [0.2]
    batch = task.collate_items(items)
    assert batch["image"].shape == (3, 3, 32, 32) and batch["n"].tolist() == [2, 1, 1]
    assert batch["answer"] == ["red", "pink", "blue", "yes"]
    assert batch["weight"].tolist() == pytest.approx([0.9, 0.1, 1.0, 0.2])


def test_bad_training_files_fail_when_built(tmp_path):
    _files(tmp_path)
    (tmp_path / "caps.json").write_text(json.dumps([{"image": "a.jpg", "caption": "a red square"}]))
    with pytest.raises(ValueError, match="caps.json: entry 0 is not a VQA training entry"):
        task.VqaDataset([tmp_path / "caps.json"])
    (tmp_path / "gone.json").write_text(json.dumps([{"image": "c.jpg", "question": "q", "answer": ["x"]}]))
    with pytest.raises(OSError, match="image not found: .*c.jpg"):
        task.VqaDataset([tmp_path / "gone.json"])
    with pytest.raises(OSError, match="not found: .*nope.json"):
        task.VqaDataset([tmp_path / "nope.json"])
    with pytest.raises(ValueError, match="no folder for dataset 'vg'"):
        task.VqaDataset([tmp_path / "vg.json"], image_root={"vqa": str(tmp_path)})
    assert len(task.VqaDataset([tmp_path / "vg.json"], image_root={"vg": str(tmp_path)})) == 1


# ------------------------------------------------------------------------------ accuracy
def test_normalisation_follows_the_official_rules():
    assert normalize_answer("Two dogs.") == "2 dogs"
    assert normalize_answer("the cat's toy") == "cat's toy"
    assert normalize_answer("dont know") == "don't know"
    assert normalize_answer(" a\tyes ") == "yes"
    assert process_punctuation("yes, sir") == "yes sir"       # mark beside a space: removed
    assert process_punctuation("black/white") == "black white"  # otherwise: a space
    assert process_punctuation("1,000") == "1000"              # digit,digit: every mark removed
    assert normalize_answer("3.5") == "3.5" and normalize_answer("none") == "0"


def test_accuracy_averages_min_matches_over_3_across_leave_one_out_subsets():
    gts = ["2"] * 2 + ["3"] * 8
    # leaving out one of the two "2"s leaves 1 match (1/3); leaving out a "3" leaves 2 (2/3)
    assert vqa_accuracy("2", gts) == pytest.approx((2 * (1 / 3) + 8 * (2 / 3)) / 10)
    assert vqa_accuracy("two", gts) == pytest.approx(vqa_accuracy("2", gts))  # answers differ: normalised
    assert vqa_accuracy("3", gts) == 1.0 and vqa_accuracy("4", gts) == 0.0
    three = ["red"] * 3 + ["pink"] * 7  # 3 humans: a subset of 9 keeps 3 (7 times) or 2 (3 times)
    assert vqa_accuracy("Red", three) == pytest.approx((7 * 1 + 3 * (2 / 3)) / 10)
    assert vqa_accuracy("two", ["2"] * 10) == 0.0  # identical answers: the official skips normalising
    assert vqa_accuracy("yes", ["yes"]) == 1.0 and vqa_accuracy("no", ["yes"]) == 0.0
    assert vqa_accuracy("yes", ["yes", "yes"]) == 1.0


# ------------------------------------------------------------------------------ end to end
def test_finetune_then_evaluate_end_to_end(tmp_path, capsys):
    _files(tmp_path)
    out = tmp_path / "run"
    rc = main(["finetune", "--task", "vqa", "--out", str(out), "--no-progress", "model=tiny", "image_size=32",
               f'train_files=["{tmp_path / "vqa.json"}", "{tmp_path / "vg.json"}"]',
               f"val_file={tmp_path / 'vqa.json'}",
               f"answer_list={tmp_path / 'answers.json'}", "batch_size=2", "epochs=1", "init_lr=1e-4",
               "ckpt_interval=0", "device=cpu"])
    assert rc == 0
    best = json.loads((out / "best.json").read_text())
    assert best["epoch"] == 0 and 0 <= best["score"] <= 100 and "last epoch" in best["rule"]
    model = blip.load(out / "model", device="cpu")
    assert model.config.task == "vqa" and model.config.vision.image_size == 32
    assert model.answer(tmp_path / "a.jpg", "what color is it?", ["red", "blue"])[0] in ("red", "blue")
    assert isinstance(model.answer(tmp_path / "a.jpg", "what color is it?")[0], str)
    capsys.readouterr()
    rc = main(["evaluate", "--task", "vqa", "--model", str(out / "model"), "--data", str(tmp_path / "vqa.json"),
               "--answers", str(tmp_path / "answers.json"), "--out", str(tmp_path / "res"), "--json", "--quiet",
               "--device", "cpu"])
    assert rc == 0
    metrics = json.loads(capsys.readouterr().out)
    results = json.loads((tmp_path / "res" / "vqa_result.json").read_text())
    assert [r["question_id"] for r in results] == [1, 2] and all(r["answer"] in ("red", "blue", "pink", "yes")
                                                                  for r in results)
    gts = {1: ["red"] * 9 + ["pink"], 2: ["blue"] * 10}
    expected = 100 * sum(vqa_accuracy(r["answer"], gts[r["question_id"]]) for r in results) / 2
    assert metrics["questions"] == 2 and metrics["acc"] == pytest.approx(expected)
    assert vqa_eval.score(metrics) == metrics["acc"]


def test_evaluate_without_answers_writes_the_submission_only(tmp_path):
    _files(tmp_path)
    test = [{"question_id": 7, "image": "a.jpg", "question": "what color?", "dataset": "vqa"}]
    (tmp_path / "test.json").write_text(json.dumps(test))
    torch.manual_seed(0)
    model = blip.create_model("tiny", task="vqa", **{"vision.image_size": 32}).eval()
    metrics = vqa_eval.evaluate(model, tmp_path / "test.json", out_dir=tmp_path / "o", inference="generate")
    assert "acc" not in metrics and metrics["questions"] == 1
    assert json.loads((tmp_path / "o" / "vqa_result.json").read_text())[0]["question_id"] == 7
    with pytest.raises(ValueError, match="no human answers"):
        vqa_eval.score(metrics)


def test_caption_file_given_to_vqa_is_one_line_exit_2(tmp_path, capsys):
    _files(tmp_path)
    (tmp_path / "caps.json").write_text(json.dumps([{"image": "a.jpg", "caption": "a red square"}]))
    rc = main(["finetune", "--task", "vqa", "--out", str(tmp_path / "r"), "--no-progress", "model=tiny",
               f'train_files=["{tmp_path / "caps.json"}"]', "device=cpu"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and "is not a VQA training entry" in err
    rc = main(["evaluate", "--task", "vqa", "--model", "tiny", "--data", str(tmp_path / "caps.json"), "--quiet"])
    errors = [line for line in capsys.readouterr().err.splitlines() if "warning" not in line]  # tiny: random weights
    assert rc == 2 and len(errors) == 1 and "is not a VQA question" in errors[0]


def test_shipped_configs_follow_the_official_vqa_yaml():
    from pathlib import Path

    from blip.train.config import TrainConfig
    root = Path(__file__).resolve().parents[1] / "configs"
    cfg = TrainConfig.load(root / "vqa.json")
    assert (cfg.task, cfg.init, cfg.batch_size, cfg.init_lr, cfg.min_lr, cfg.weight_decay, cfg.epochs) == \
        ("vqa", "model_base_capfilt_large", 16, 2e-5, 0.0, 0.05, 10) and cfg.schedule == "cosine"
    assert cfg.model_config().vision.image_size == 480 and cfg.model_config().vision.drop_path == 0.1
    assert cfg.eval_options == {"inference": "rank", "k_test": 128, "batch_size": 32} and cfg.min_scale == 0.5
    assert [Path(f).name for f in cfg.train_files] == ["vqa_train.json", "vqa_val.json", "vg_qa.json"]
    for name in ("vqa_synthetic.json", "vqa_synthetic_scratch.json"):
        small = TrainConfig.load(root / name)
        assert small.task == "vqa" and small.model_config().vision.image_size == 64 and not small.hflip
    assert TrainConfig.load(root / "vqa_synthetic_scratch.json").init is None
