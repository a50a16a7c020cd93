"""Trimmed vocabularies (blip.vocab): a model keeping only its corpus's tokens reads and scores those
tokens exactly as the full model does, reads the others as [UNK], never generates them, survives every
save format, and trains from `vocab_from`."""
import json

import pytest
import torch
import torch.nn.functional as F

import blip
from blip import vocab
from blip.checkpoint import save_blip, save_hf, save_official
from blip.config import BlipConfig, get_config
from blip.factory import create_model
from blip.tokenizer import DEC_ID, UNK_ID, BlipTokenizer
from blip.train.config import TrainConfig
from blip.train.loop import Trainer

pytestmark = pytest.mark.usefixtures("one_thread")

TEXTS = ["a red circle left of a blue star", "a green square"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    d = tmp_path_factory.mktemp("vocab")
    (d / "pairs.json").write_text(json.dumps([{"image": "a.jpg", "caption": TEXTS[0]},
                                              {"image": "b.jpg", "caption": [TEXTS[1], "two objects"]}]))
    (d / "answers.json").write_text(json.dumps(["yes", "no"]))
    return d


@pytest.fixture(scope="module")
def models(corpus):
    torch.manual_seed(0)
    full = create_model("tiny", task="pretrain", device="cpu").eval()
    ids = vocab.corpus_token_ids([corpus / "pairs.json", corpus / "answers.json"])
    return full, vocab.trim(full, ids).eval(), ids


def test_corpus_token_ids_cover_every_text_field_and_the_special_tokens(corpus):
    ids = vocab.corpus_token_ids([corpus / "pairs.json", corpus / "answers.json"])
    tok = BlipTokenizer()
    words = tok(TEXTS + ["two objects", "yes", "no"], max_length=30)[0].flatten().tolist()
    assert set(words) <= set(ids) and set(vocab.SPECIAL_IDS) <= set(ids) and ids == sorted(ids)
    assert len(ids) < 30
    (corpus / "bad.json").write_text("{}")
    with pytest.raises(ValueError, match="JSON list"):
        vocab.corpus_token_ids([corpus / "bad.json"])
    with pytest.raises(ValueError, match="cannot read"):
        vocab.corpus_token_ids([corpus / "missing.json"])


def test_trimmed_model_reads_and_scores_its_tokens_as_the_full_model(models):
    full, small, ids = models
    prompt = full.tokenizer([full.config.prompt], max_length=30)[0].flatten().tolist()  # "a picture of"
    assert small.config.text.vocab_ids == sorted(set(ids + prompt)) and small.config.text.vocab_size == 30524
    ids = small.config.text.vocab_ids
    assert small.text_decoder.cls.predictions.decoder.weight.shape[0] == len(ids)
    assert sum(p.numel() for p in small.parameters()) < sum(p.numel() for p in full.parameters())
    images = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(small.embed_texts(TEXTS), full.embed_texts(TEXTS))
        torch.testing.assert_close(small.match(images, TEXTS)["itm"], full.match(images, TEXTS)["itm"])
        # decoder logits: the kept ids' values, -inf elsewhere; its loss is the CE over the kept rows
        ids_t, mask = full.tokenizer(TEXTS, max_length=30, first_token=DEC_ID)
        states = full.visual_encoder(images)
        a, b = full.text_decoder(ids_t, mask, states), small.text_decoder(ids_t, mask, states)
        kept = torch.tensor(ids)
        torch.testing.assert_close(b[..., kept], a[..., kept])
        others = torch.ones(30524, dtype=torch.bool)
        others[kept] = False
        assert torch.isneginf(b[..., others]).all()
        loss = small.text_decoder.lm_loss(ids_t, mask, states)
        rows = {t: r for r, t in enumerate(ids)}
        targets = ids_t.masked_fill(mask == 0, -100)[:, 1:].apply_(lambda t: rows.get(t, t))
        want = F.cross_entropy(a[:, :-1][..., kept].transpose(1, 2), targets, ignore_index=-100, label_smoothing=0.1)
        torch.testing.assert_close(loss, want)
        # an id it lacks reads as [UNK]
        z_ids, z_mask = full.tokenizer(["a zebra circle"], max_length=30)
        assert z_ids[0, 2] not in ids
        unk = z_ids.clone()
        unk[0, 2] = UNK_ID
        torch.testing.assert_close(small.text_encoder(z_ids, z_mask, mode="text"),
                                   full.text_encoder(unk, z_mask, mode="text"))
        caps = small.caption(images, num_beams=2, max_length=10, return_ids=True)
    assert all(set(c["ids"]) <= set(small.config.text.vocab_ids) for c in caps)


def test_trimmed_model_survives_every_save_format(models, tmp_path):
    _, small, ids = models
    images = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        want_txt, want_cap = small.embed_texts(TEXTS), small.caption(images, num_beams=2, max_length=10)
    heads = {"text.heads": 2, "vision.heads": 2}  # not in a bare state dict: the tiny preset's
    for load in (lambda: blip.load(save_blip(small, tmp_path / "ours"), device="cpu"),
                 lambda: blip.load(save_official(small, tmp_path / "o.pth"), config=heads, device="cpu")):
        m = load().eval()
        with torch.no_grad():
            torch.testing.assert_close(m.embed_texts(TEXTS), want_txt)
            assert m.caption(images, num_beams=2, max_length=10) == want_cap
    assert blip.load(tmp_path / "ours", device="cpu").config.text.vocab_ids == small.config.text.vocab_ids
    official = blip.load(tmp_path / "o.pth", config=heads, device="cpu")
    assert official.config.text.vocab_ids is None and official.text_encoder.embeddings.word_embeddings.num_embeddings == 30524
    hf = save_hf(blip.load(save_blip(small, tmp_path / "cap"), task="caption", device="cpu"), tmp_path / "hf")
    with torch.no_grad():
        assert blip.load(hf, config=heads, device="cpu").eval().caption(images, num_beams=2, max_length=10) == want_cap


def test_vocab_ids_are_checked():
    d = get_config("tiny").to_dict()
    for bad in ([0, 100, 50], [100, 101], [0, 100, 40000], [0, 0, 100], []):
        d["text"]["vocab_ids"] = bad
        with pytest.raises(ValueError, match="vocab_ids"):
            BlipConfig.from_dict(d)


def test_training_with_vocab_from_trims_and_warns_about_unknown_tokens(corpus, tmp_path, capsys):
    words = [f"a {c} {t} number {i}" for i, (c, t) in enumerate(zip(["red", "green", "blue", "yellow"] * 2,
                                                                      ["square", "circle", "stripe", "dot"] * 2))]
    (corpus / "synthetic.json").write_text(json.dumps([{"image": "x.jpg", "caption": w} for w in words]))
    common = dict(model="tiny", synthetic_pairs=8, batch_size=4, queue_size=0, distill=False, epochs=1,
                  progress=False, log_interval=1, ckpt_interval=0, device="cpu")
    trainer = Trainer(TrainConfig.from_dict(dict(common, vocab_from=[str(corpus / "synthetic.json")])), tmp_path / "a")
    kept = trainer.model.config.text.vocab_ids
    assert kept is not None and len(kept) < 40
    assert trainer.train()["finished"]
    model = blip.load(tmp_path / "a" / "model", device="cpu")
    assert model.config.text.vocab_ids == kept
    # finetuning it on text with other words: trained as [UNK], and said
    (corpus / "other.json").write_text(json.dumps([{"image": "x.jpg", "caption": "a zebra on a mat"}]))
    capsys.readouterr()
    Trainer(TrainConfig.from_dict(dict(common, init=str(tmp_path / "a" / "model"), train_files=[str(corpus / "other.json")])),
            tmp_path / "b", dataset=trainer.dataset).close()
    assert "lacks" in capsys.readouterr().out
    assert vocab.unknown_share(model.config, ["a zebra on a mat"]) > 0 == vocab.unknown_share(model.config, words)
