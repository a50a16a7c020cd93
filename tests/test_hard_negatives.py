"""Harder in-batch negatives: TrainConfig.similar_groups (batches of groups of items whose captions share the
most words) and itc_swap_negatives (word-swapped captions as extra ITC text negatives)."""
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import blip
from blip.train import objectives as obj

from blip.train.config import TrainConfig
from blip.train.data import SeededItems, SimilarTextSampler, make_loader

COLOURS = ["red", "green", "blue", "yellow"]
SHAPES = ["circle", "square", "star", "cross"]


class Items:
    def __init__(self, n):
        self.n = n

    def __len__(self):
        return self.n


BACKGROUNDS = ["grass", "sand", "snow", "water"]


def _texts(n, seed=0):
    """Captions in 4 families: within a family they share two words (colour and background), across families
    at most the shape and the template, which every caption has (and the IDF weighting discounts)."""
    rng = np.random.default_rng(seed)
    return [f"a photo of a {COLOURS[i % 4]} {SHAPES[int(rng.integers(4))]} on {BACKGROUNDS[i % 4]}" for i in range(n)]


def _order(texts, group=4, batch=8, world=1, rank=0, epoch=0, seed=1):
    s = SimilarTextSampler(Items(len(texts)), texts, batch, group, world, rank, seed)
    s.set_epoch(epoch)
    return list(s), s


def test_groups_hold_the_items_whose_captions_share_the_most_words():
    texts = _texts(64)
    order, sampler = _order(texts)
    assert len(order) == len(sampler) == 64 and sorted(order) == list(range(64))  # every item once
    for g in range(0, 64, 4):
        assert len({texts[i].split()[4] for i in order[g:g + 4]}) == 1  # one colour per group
    # the groups themselves are shuffled: batches mix families
    assert any(len({texts[i].split()[4] for i in order[b:b + 8]}) > 1 for b in range(0, 64, 8))


def test_the_order_is_seeded_per_epoch_and_the_ranks_split_the_batches():
    texts = _texts(70)
    a, _ = _order(texts, epoch=3)
    assert a == _order(texts, epoch=3)[0]
    assert a != _order(texts, epoch=4)[0] and a != _order(texts, epoch=3, seed=2)[0]
    assert len(a) == 64  # drop_last: 8 full batches of 8
    ranks = [_order(texts, world=2, rank=r, epoch=3)[0] for r in (0, 1)]
    assert len(ranks[0]) == len(ranks[1]) == 32 and not set(ranks[0]) & set(ranks[1])
    batches = [a[i:i + 8] for i in range(0, 64, 8)]
    assert ranks[0] == [i for b in batches[0::2] for i in b]  # rank r: batches r, r + world, ...


def test_bad_group_sizes_and_counts_are_refused():
    with pytest.raises(ValueError, match="similar_groups"):
        SimilarTextSampler(Items(8), _texts(8), 8, 1, 1, 0, 0)
    with pytest.raises(ValueError, match="similar_groups"):
        SimilarTextSampler(Items(8), _texts(8), 8, 9, 1, 0, 0)
    with pytest.raises(ValueError, match="texts"):
        SimilarTextSampler(Items(9), _texts(8), 8, 4, 1, 0, 0)


def test_make_loader_groups_a_caption_files_items_and_resumes_mid_epoch(tmp_path):
    from PIL import Image
    from blip.data import JsonCaptionDataset
    from blip.transform import TrainTransform
    texts = _texts(32)
    anns = []
    for i, t in enumerate(texts):
        Image.new("RGB", (16, 16), (i * 7 % 255, 0, 0)).save(tmp_path / f"{i}.png")
        anns.append({"image": f"{i}.png", "caption": [t, t + " again"] if i % 2 else t})
    (tmp_path / "a.json").write_text(json.dumps(anns))
    data = SeededItems(JsonCaptionDataset(tmp_path / "a.json", transform=TrainTransform(16, min_scale=1.0,
                                                                                        randaugment=False)))
    cfg = TrainConfig.load(None, ["batch_size=8", "similar_groups=4", "seed=3"])
    full = list(make_loader(data, cfg, rank=0, world=1, epoch=0))
    assert len(full) == 4
    for b in full:
        for g in (b["index"][:4], b["index"][4:]):
            assert len({texts[int(i)].split()[4] for i in g}) == 1
    vectors = data._text_vectors
    resumed = make_loader(data, cfg, rank=0, world=1, epoch=0, skip_batches=3)
    assert resumed.sampler.vectors is vectors  # computed once, not every epoch
    resumed = list(resumed)
    assert len(resumed) == 1 and resumed[0]["index"].tolist() == full[3]["index"].tolist()

    for bad in (["similar_groups=4", "shards=x.tar"], ["similar_groups=9", "batch_size=8"],
                ["itc_swap_negatives=true", "distill=false"], ["itc_swap_negatives=true", 'itm_swap_words="synthetic"']):
        with pytest.raises(ValueError, match="similar_groups|itc_swap_negatives"):
            TrainConfig.load(None, bad)

    class NoCaptions(Items):
        def __getitem__(self, i):
            return None
    with pytest.raises(ValueError, match="captions"):
        make_loader(SeededItems(NoCaptions(8)), cfg, rank=0, world=1, epoch=0)


def test_itc_with_extra_text_negatives_adds_those_columns_to_image_to_text_only():
    torch.manual_seed(0)
    img, txt = (F.normalize(torch.randn(6, 16), dim=-1) for _ in range(2))
    temp = torch.tensor(0.07)
    empty = torch.zeros(16, 0)
    plain, _, _ = obj.itc_loss(img, txt, img, txt, empty, empty, temp, 0.0)
    neg = F.normalize(txt + 0.1 * torch.randn(6, 16), dim=-1).requires_grad_()  # near-copies: hard negatives
    harder, s_i2t, s_t2i = obj.itc_loss(img, txt, img, txt, empty, neg.T, temp, 0.0)
    assert s_i2t.shape == (6, 12) and s_t2i.shape == (6, 6)
    i2t = torch.cat([img @ txt.T, img @ neg.T], 1) / temp
    expected = (F.cross_entropy(i2t, torch.arange(6)) + F.cross_entropy(txt @ img.T / temp, torch.arange(6))) / 2
    torch.testing.assert_close(harder, expected)
    assert harder > plain
    harder.backward()
    assert neg.grad.abs().sum() > 0


def test_the_objective_puts_swapped_captions_into_itc_and_needs_in_batch_itc():
    torch.manual_seed(0)
    model = blip.create_model("tiny", task="pretrain", device="cpu", **{"vision.pool": "max"}).eval()  # no dropout
    with pytest.raises(ValueError, match="distill=False"):
        obj.PretrainObjective(model, itc_swap_negatives=True)
    from blip.tokenizer import get_tokenizer
    tok = get_tokenizer()
    ids, mask = tok(["a red circle", "a blue square", "a green star"], max_length=30, padding="longest")
    neg_ids, neg_mask = tok(["a red square", "a blue square", "a green cross"], max_length=30, padding="longest")
    batch = {"image": torch.randn(3, 3, 64, 64), "input_ids": ids, "attention_mask": mask,
             "neg_input_ids": neg_ids, "neg_attention_mask": neg_mask, "neg_valid": torch.tensor([True, False, True])}
    losses = {}
    for on in (False, True):
        o = obj.PretrainObjective(model, distill=False, queue_size=0, itc_swap_negatives=on, itc_only_steps=1)
        losses[on] = o(batch)["loss_ita"]
    assert losses[True] > losses[False]  # two more columns in image-to-text
    o = obj.PretrainObjective(model, distill=False, queue_size=0, itc_swap_negatives=True, itc_only_steps=1)
    feats = obj.unimodal_features(model, batch["image"], ids, mask)
    neg = F.normalize(model.text_proj(model.text_encoder(neg_ids[[0, 2]], neg_mask[[0, 2]], mode="text")[:, 0]), dim=-1)
    expected, _, _ = obj.itc_loss(feats[1], feats[2], feats[1], feats[2], torch.zeros(neg.shape[1], 0), neg.T,
                                  model.temp, 0.0)
    torch.testing.assert_close(o(batch)["loss_ita"], expected.detach(), rtol=1e-4, atol=1e-5)
