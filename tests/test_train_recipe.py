"""The short-run recipe options beyond the paper: in-batch ITC without momentum towers, ITC-only warmup
steps, word-swap ITM negatives, the per-step warmup-cosine schedule."""
import math
import random

import pytest
import torch
import torch.nn.functional as F

import blip
from blip.train import objectives as obj
from blip.train.config import TrainConfig
from blip.train.data import Collate, SeededItems, WordSwap
from blip.train.loop import Trainer
from blip.train.schedule import WarmupCosine

from test_train import tiny_batch


def test_word_swap_replaces_one_word_of_its_group():
    swap = WordSwap([["red", "blue", "green"], ["left", "right"]])
    rng = random.Random(0)
    for _ in range(50):
        out = swap("a red circle on the left of a blue star", rng)
        a, b = "a red circle on the left of a blue star".split(), out.split()
        changed = [(x, y) for x, y in zip(a, b) if x != y]
        assert len(a) == len(b) and len(changed) == 1
        x, y = changed[0]
        assert {x, y} <= {"red", "blue", "green"} or {x, y} == {"left", "right"}
    assert swap("two cats", rng) is None
    assert swap("a Red square", random.Random(1)).split()[0:3:2] == ["a", "square"]  # case-insensitive, whole words
    assert swap("bored", rng) is None  # not inside words
    assert WordSwap.build(None) is None and WordSwap.build("synthetic")("a cyan hexagon", rng) != "a cyan hexagon"


def test_word_swap_phrases_and_synonyms():
    # alternatives are phrases or synonym lists: a swap never gives a synonym or a phrase the captions never use
    swap = WordSwap([["on the left", "at the top"], [["above", "over"], ["below", "under", "beneath"]]])
    rng = random.Random(0)
    for _ in range(30):
        assert swap("a star on  the left", rng) == "a star at the top"  # any spacing
        assert swap("a star under a cross", rng) in ("a star above a cross", "a star over a cross")
        assert swap("a star Over a cross", rng) in {f"a star {w} a cross" for w in ("below", "under", "beneath")}
    assert swap("a star on the top", rng) is None  # "top" alone is no alternative
    synthetic = WordSwap.build("synthetic")
    outs = {synthetic("a red circle to the left of a blue star", random.Random(i)) for i in range(200)}
    assert "a red circle to the right of a blue star" in outs
    assert not any("to the top of" in o or "on the right of" in o for o in outs)
    for bad in ([["red"]], [["red", "blue"], ["blue", "green"]]):
        with pytest.raises(ValueError):
            WordSwap(bad)


def test_word_swap_rare_pick_favours_groups_few_texts_name():
    texts = ["a red star"] * 8 + ["a red star on the left"] * 2
    swap = WordSwap.build([["red", "blue"], ["on the left", "on the right"]], "rare", texts)
    assert swap.weight == {0: 1.0, 1: 5.0}
    rng = random.Random(0)
    outs = [swap("a red star on the left", rng) for _ in range(600)]
    share = sum(o.endswith("on the right") for o in outs) / len(outs)
    assert abs(share - 5 / 6) < 0.05  # group weights 1 : 5; plain "word" picking would give 1/2
    word = WordSwap([["red", "blue"], ["on the left", "on the right"]], "word")
    share = sum(word("a red star on the left", rng).endswith("right") for _ in range(600)) / 600
    assert abs(share - 0.5) < 0.07
    with pytest.raises(ValueError, match="training texts"):
        WordSwap.build([["red", "blue"]], "rare")


def test_seeded_items_add_reproducible_swapped_captions_and_collate_marks_rows():
    class Texts(torch.utils.data.Dataset):
        def __len__(self):
            return 4

        def __getitem__(self, i):
            return {"image": torch.zeros(3, 8, 8), "text": ["a red circle", "two cats", "a small star", "on the left"][i],
                    "index": i}
    items = SeededItems(Texts(), seed=1, swap=WordSwap.build("synthetic"))
    first = [items[i]["neg_text"] for i in range(4)]
    assert first == [items[i]["neg_text"] for i in range(4)]  # same seed, epoch and index: same negative
    assert first[1] is None and all(t is not None for t in (first[0], first[2], first[3]))
    batch = Collate()([items[i] for i in range(4)])
    assert batch["neg_valid"].tolist() == [True, False, True, True]
    assert batch["neg_input_ids"].shape[0] == 4


def test_in_batch_itc_without_momentum_is_symmetric_infonce():
    torch.manual_seed(0)
    model = blip.create_model("tiny", task="pretrain", device="cpu")
    o = obj.PretrainObjective(model, queue_size=0, distill=False)
    assert o.momentum is None and not any("_m." in k for k in o.state_dict())
    o.eval()  # no dropout: the direct computation below sees the same features
    batch = tiny_batch(model)
    out = o(batch, obj.StepInfo(0, 3, 10))
    img = F.normalize(model.vision_proj(model.visual_encoder(batch["image"])[:, 0]), dim=-1)
    txt = F.normalize(model.text_proj(model.text_encoder(batch["input_ids"], batch["attention_mask"],
                                                         mode="text")[:, 0]), dim=-1)
    logits = img @ txt.t() / model.temp
    labels = torch.arange(len(logits))
    expected = (F.cross_entropy(logits, labels) + F.cross_entropy(logits.t(), labels)) / 2
    assert torch.allclose(out["loss_ita"], expected, atol=1e-5) and out["alpha"] == 0.0


def test_itc_only_steps_skip_itm_and_lm_then_word_swap_negatives_join_itm():
    torch.manual_seed(0)
    model = blip.create_model("tiny", task="pretrain", device="cpu")
    o = obj.PretrainObjective(model, queue_size=0, distill=False, itc_only_steps=5)
    batch = tiny_batch(model)
    out = o(batch, obj.StepInfo(0, 4, 10))
    assert out["loss_itm"] == 0 and out["loss_lm"] == 0
    out["loss"].backward()
    assert model.itm_head.weight.grad is None and model.vision_proj.weight.grad is not None
    o.eval()
    torch.manual_seed(1)
    plain = o(batch, obj.StepInfo(0, 5, 10))["loss_itm"]
    swapped = ["a dog on a blue mat", "two cats", "a red car parked by a tree", "sky"]
    ids, mask = model.tokenizer(swapped, max_length=30)
    none_valid = dict(batch, neg_input_ids=ids, neg_attention_mask=mask, neg_valid=torch.zeros(4, dtype=torch.bool))
    torch.manual_seed(1)
    assert torch.allclose(o(none_valid, obj.StepInfo(0, 5, 10))["loss_itm"], plain)  # no valid row: official ITM
    with_swaps = dict(none_valid, neg_valid=torch.tensor([True, False, True, False]))
    torch.manual_seed(1)
    got = o(with_swaps, obj.StepInfo(0, 5, 10))["loss_itm"]
    assert not torch.allclose(got, plain)


def test_warmup_cosine_schedule():
    s = WarmupCosine(init_lr=1e-3, min_lr=1e-4, warmup_lr=1e-6, warmup_steps=10, steps_per_epoch=50, total_steps=110)
    assert s(0, 0) == 1e-6 and math.isclose(s(0, 5), (1e-6 + 1e-3) / 2) and math.isclose(s(0, 10), 1e-3)
    assert math.isclose(s(1, 10), 1e-4 + 0.9e-3 * 0.5)  # halfway through the decay (global step 60)
    assert math.isclose(s(2, 10), 1e-4) and math.isclose(s(5, 0), 1e-4)


def test_recipe_options_train_end_to_end(tmp_path):
    cfg = TrainConfig.from_dict(dict(model="tiny", synthetic_pairs=16, batch_size=4, queue_size=0, distill=False,
                                     itc_only_steps=2, itm_swap_words=[["number", "digit"]], schedule="warmup_cosine",
                                     warmup_steps=2, epochs=2, progress=False, log_interval=1, ckpt_interval=0,
                                     device="cpu"))
    trainer = Trainer(cfg, tmp_path / "run")
    summary = trainer.train()
    assert summary["finished"] and (tmp_path / "run" / "model" / "model.pth").exists()
    model = blip.load(tmp_path / "run" / "model", device="cpu")
    assert len(model.caption(torch.zeros(1, 3, 64, 64), num_beams=1)) == 1


def test_loss_weights_and_easy_itm_negatives_first():
    torch.manual_seed(0)
    model = blip.create_model("tiny", task="pretrain", device="cpu")
    batch = tiny_batch(model)
    o = obj.PretrainObjective(model, queue_size=0, distill=False, loss_weights={"itm": 3.0, "lm": 0.5},
                              itm_hard_from=10, itm_swap_from=10)
    o.eval()
    out = o(batch, obj.StepInfo(0, 3, 10))
    expected = out["loss_ita"] + 3.0 * out["loss_itm"] + 0.5 * out["loss_lm"]
    assert torch.allclose(out["loss"].detach(), expected)
    # before itm_swap_from: no word swaps (same loss with or without them)
    ids, mask = model.tokenizer(["a dog on a blue mat", "two cats", "a red car parked by a tree", "sky"], max_length=30)
    swaps = dict(batch, neg_input_ids=ids, neg_attention_mask=mask, neg_valid=torch.ones(4, dtype=torch.bool))
    torch.manual_seed(5)
    early = o(swaps, obj.StepInfo(0, 9, 10))
    torch.manual_seed(5)
    assert torch.allclose(early["loss_itm"], o(batch, obj.StepInfo(0, 9, 10))["loss_itm"])
    assert math.isclose(early["itm_prior"], -(1 / 3 * math.log(1 / 3) + 2 / 3 * math.log(2 / 3)))
    late = o(swaps, obj.StepInfo(1, 0, 10))
    assert math.isclose(late["itm_prior"], -(0.25 * math.log(0.25) + 0.75 * math.log(0.75)))
    try:
        obj.PretrainObjective(model, queue_size=0, distill=False, loss_weights={"itc": 1.0})
    except ValueError as e:
        assert "ita" in str(e)
    else:
        raise AssertionError("an unknown loss name must be refused")


def test_itm_pairs_runs_itm_on_the_first_pairs_only():
    torch.manual_seed(0)
    model = blip.create_model("tiny", task="pretrain", device="cpu")
    batch = tiny_batch(model)
    o = obj.PretrainObjective(model, queue_size=0, distill=False, itm_hard_from=None, itm_pairs=2).eval()
    full = obj.PretrainObjective(model, queue_size=0, distill=False, itm_hard_from=None).eval()
    first = {k: v[:2] for k, v in batch.items()}
    # two pairs: each one's only uniform negative is the other, so ITM is the same as on a batch of those two
    got, ref = o(batch, obj.StepInfo(0, 3, 10)), full(first, obj.StepInfo(0, 3, 10))
    assert torch.allclose(got["loss_itm"], ref["loss_itm"], atol=1e-6)
    assert not torch.allclose(got["loss_ita"], ref["loss_ita"])  # ITC still sees all four pairs
    assert math.isclose(got["itm_prior"], ref["itm_prior"])
    for bad in (dict(itm_pairs=1), dict(itm_pairs=2, negatives_all_rank=True)):
        try:
            obj.PretrainObjective(model, queue_size=0, distill=False, **bad)
        except ValueError as e:
            assert "itm_pairs" in str(e)
        else:
            raise AssertionError(f"{bad} must be refused")


def test_clip_init_widens_the_attention_weights_from_scratch():
    from blip.train.init_weights import clip_init
    torch.manual_seed(0)
    model = blip.create_model("mini", task="pretrain", device="cpu")
    before = model.visual_encoder.blocks[0].attn.qkv.weight.std().item()
    done = clip_init(model)
    after = model.visual_encoder.blocks[0].attn.qkv.weight.std().item()
    assert abs(before - 0.02) < 0.003 and abs(after - 192 ** -0.5) < 0.005
    cross = model.text_encoder.layers[0].crossattention.self.query.weight.std().item()
    assert abs(cross - 192 ** -0.5) < 0.005 and "visual_encoder" in done



def test_objective_options_keep_a_none_value_but_take_the_tasks_own_defaults():
    from blip.train.tasks import objective_options
    cfg = TrainConfig.from_dict(dict(task="pretrain", itm_hard_from=None, distill=False, queue_size=0))
    opts = objective_options("pretrain", cfg)
    assert "itm_hard_from" in opts and opts["itm_hard_from"] is None  # None = never mine: passed on as a value
    assert "alpha_ramp_epochs" not in opts  # left unset: the objective's own default (2)
    assert "max_length" not in objective_options("caption", TrainConfig.from_dict(dict(task="caption")))
    retrieval = objective_options("retrieval", TrainConfig.from_dict(dict(task="retrieval")))
    assert "max_length" not in retrieval and "alpha_ramp_epochs" not in retrieval  # 35 and 1, the official values
    set_ = objective_options("retrieval", TrainConfig.from_dict(dict(task="retrieval", max_length=20,
                                                                     alpha_ramp_epochs=3)))
    assert set_["max_length"] == 20 and set_["alpha_ramp_epochs"] == 3


def test_image_words_loss_matches_a_direct_computation_and_reaches_the_tower():
    torch.manual_seed(0)
    rows = torch.tensor([[0, 3, 5, 3, 2], [0, 4, 2, -100, -100]])  # [CLS]-first rows, pads -100
    words = obj.caption_words(rows, 6)
    assert words.tolist() == [[0, 0, 1, 1, 0, 1], [0, 0, 1, 0, 1, 0]]  # the first column ([CLS]) skipped
    patch_logits = torch.randn(2, 5, 6)
    best = patch_logits.amax(1)
    direct = torch.stack([sum(-(w * math.log(torch.sigmoid(x)) + (1 - w) * math.log(1 - torch.sigmoid(x)))
                              for x, w in zip(best[b], words[b])) / words[b].sum() for b in range(2)]).mean()
    assert torch.allclose(obj.image_words_loss(patch_logits, words), direct, atol=1e-5)

    model = blip.create_model("tiny", task="pretrain", device="cpu")
    batch = tiny_batch(model)
    o = obj.PretrainObjective(model, queue_size=0, distill=False, image_words=0.5).eval()
    out = o(batch, obj.StepInfo(0, 3, 10))
    expected = out["loss_ita"] + out["loss_itm"] + out["loss_lm"] + 0.5 * out["loss_words"]
    assert torch.allclose(out["loss"].detach(), expected)
    out["loss"].backward()
    assert o.word_head.weight.grad.abs().sum() > 0  # the head starts at zero: its weights learn first
    # once they have, it trains the image tower too (the other losses weighted 0: the tower's only gradient)
    alone = obj.PretrainObjective(model, queue_size=0, distill=False, image_words=1.0,
                                  loss_weights={"ita": 0.0, "itm": 0.0, "lm": 0.0}).eval()
    with torch.no_grad():
        alone.word_head.weight.normal_()
    model.zero_grad(set_to_none=True)
    alone(batch, obj.StepInfo(0, 3, 10))["loss"].backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.visual_encoder.parameters())
    assert "word_head.weight" not in model.state_dict()  # a training-only head, not saved with the model
    plain = obj.PretrainObjective(model, queue_size=0, distill=False).eval()
    assert "loss_words" not in plain(batch, obj.StepInfo(0, 3, 10)) and not hasattr(plain, "word_head")


def test_mask_tokens_corrupts_only_real_words_at_the_given_rate():
    g = torch.Generator().manual_seed(0)
    ids = torch.tensor([[101, 2417, 4418, 2006, 1996, 2187, 102, 0, 0]] * 400)
    mask = (ids != 0).long()
    out, targets = obj.mask_tokens(ids, mask, 0.15, generator=g)
    picked = targets != -100
    assert not picked[:, [0, 6, 7, 8]].any()  # [CLS], [SEP] and pads never picked
    assert (targets[picked] == ids[picked]).all() and (out[~picked] == ids[~picked]).all()
    rate = picked[:, 1:6].float().mean().item()
    assert 0.12 < rate < 0.18
    masked = (out[picked] == obj.MASK_ID).float().mean().item()
    assert 0.72 < masked < 0.88
    others = out[picked & (out != obj.MASK_ID)]
    assert set(others.tolist()) <= set(ids[0, 1:6].tolist())  # replacements come from the batch's own words


def test_mlm_loss_matches_a_direct_computation_and_trains_the_encoder():
    model = blip.create_model("tiny", task="pretrain", device="cpu")
    batch = tiny_batch(model)
    o = obj.PretrainObjective(model, queue_size=0, distill=False, mlm=0.5).eval()
    out = o(batch, obj.StepInfo(0, 3, 10))
    assert torch.allclose(out["loss"].detach(), out["loss_ita"] + out["loss_itm"] + out["loss_lm"]
                          + 0.5 * out["loss_mlm"])
    # by hand: the same corruption, [ENC] first, the image's states cross-attended, the LM head, plain CE
    ids, mask = batch["input_ids"], batch["attention_mask"]
    image_embeds = model.visual_encoder(batch["image"])
    corrupted, targets = obj.mask_tokens(ids, mask, 0.15, generator=torch.Generator().manual_seed(5))
    assert (targets != -100).any()
    corrupted[:, 0] = obj.ENC_ID
    hidden = model.text_encoder(corrupted, mask, encoder_states=image_embeds, mode="multimodal")
    keep = targets != -100
    direct = F.cross_entropy(model.text_decoder.cls(hidden[keep]).float(), targets[keep])
    loss = o.mlm(ids, mask, model.text_encoder.cross_kv(image_embeds), generator=torch.Generator().manual_seed(5))
    assert torch.allclose(loss, direct, atol=1e-4)
    model.zero_grad(set_to_none=True)
    loss.backward()
    assert model.text_encoder.layers[0].crossattention.self.query.weight.grad.abs().sum() > 0
    assert model.visual_encoder.patch_embed.proj.weight.grad.abs().sum() > 0
    plain = obj.PretrainObjective(model, queue_size=0, distill=False).eval()
    assert "loss_mlm" not in plain(batch, obj.StepInfo(0, 3, 10))


def test_replaced_tokens_mark_what_a_swap_put_in_whatever_its_length():
    model = blip.create_model("tiny", task="pretrain", device="cpu")
    tok = model.tokenizer
    orig = ["a small red circle on the left", "a red circle above a blue star"]
    swap = ["a large red circle on the left", "a red circle to the left of a blue star"]
    ids, mask = tok(orig, max_length=20, padding="max_length")
    s_ids, s_mask = tok(swap, max_length=20, padding="max_length")
    got = obj.replaced_tokens(ids, mask, s_ids, s_mask)
    for j, text in enumerate(swap):
        words = [tok.decode([int(t)]) for t in s_ids[j][got[j]]]
        assert " ".join(words) == ("large" if j == 0 else "to the left of")
    assert not got[s_mask == 0].any()


def test_replaced_token_loss_matches_a_direct_computation_and_joins_the_total():
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 2)
    replaced = torch.tensor([[0, 0, 1, 0, 0], [0, 1, 1, 0, 0]], dtype=torch.bool)
    valid = torch.tensor([[0, 1, 1, 1, 0], [0, 1, 1, 1, 1]], dtype=torch.bool)
    changed = [logits[0, 2], logits[1, 1], logits[1, 2]]
    kept = [logits[0, 1], logits[0, 3], logits[1, 3], logits[1, 4]]
    nll = lambda xs, y: sum(-x.log_softmax(-1)[y] for x in xs) / len(xs)  # noqa: E731
    assert torch.allclose(obj.replaced_token_loss(logits[valid], replaced[valid]),
                          0.5 * nll(changed, 0) + 0.5 * nll(kept, 1))
    model = blip.create_model("tiny", task="pretrain", device="cpu")
    batch = tiny_batch(model)
    ids, mask = model.tokenizer(["a dog on a blue mat", "two cats", "a red car parked by a tree", "sky"],
                                max_length=30, padding="max_length")
    batch = dict(batch, neg_input_ids=ids, neg_attention_mask=mask, neg_valid=torch.tensor([True, False, True, False]))
    o = obj.PretrainObjective(model, queue_size=0, distill=False, rtd=0.5).eval()
    torch.manual_seed(1)
    out = o(batch, obj.StepInfo(0, 3, 10))
    assert out["loss_rtd"] > 0
    assert torch.allclose(out["loss"].detach(), out["loss_ita"] + out["loss_itm"] + out["loss_lm"]
                          + 0.5 * out["loss_rtd"])
    torch.manual_seed(1)
    plain = obj.PretrainObjective(model, queue_size=0, distill=False).eval()(batch, obj.StepInfo(0, 3, 10))
    assert "loss_rtd" not in plain and torch.allclose(plain["loss_itm"], out["loss_itm"])  # ITM itself unchanged
