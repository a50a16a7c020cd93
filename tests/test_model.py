"""Model behaviour that must hold whatever the weights: config, tokenizer, decoding, odd inputs."""
import pytest
import torch
from PIL import Image

import blip
from blip.config import BlipConfig, get_config
from blip.tokenizer import DEC_ID, ENC_ID, BlipTokenizer, pre_caption, vocab_path


@pytest.fixture(scope="module")
def captioner(hf_dirs):
    return blip.load(hf_dirs["caption"][0])


@pytest.fixture(scope="module")
def matcher(hf_dirs):
    return blip.load(hf_dirs["retrieval"][0])


def test_config_presets_and_json_round_trip(tmp_path):
    for name in ("tiny", "mini", "small", "base", "large"):
        cfg = get_config(name)
        cfg.to_json(tmp_path / "c.json")
        assert BlipConfig.from_json(tmp_path / "c.json") == cfg
    base, large = get_config("base"), get_config("large")
    assert (base.vision.width, base.vision.depth, base.text.width, base.text.vocab_size) == (768, 12, 768, 30524)
    assert (large.vision.width, large.vision.depth, large.vision.heads) == (1024, 24, 16)
    assert base.vision.layer_norm_eps == 1e-6 and base.text.layer_norm_eps == 1e-12
    cfg = get_config("tiny", **{"vision.image_size": "96", "task": "caption", "vision.grad_checkpointing": "true"})
    assert cfg.vision.image_size == 96 and cfg.task == "caption" and cfg.vision.grad_checkpointing is True
    with pytest.raises(ValueError, match="unknown config key"):
        get_config("tiny", **{"vision.nope": 1})
    with pytest.raises(ValueError, match="unknown task"):
        get_config("tiny", task="nlvr3")


def test_tokenizer_matches_bert_tokenizer():
    from transformers import BertTokenizer
    ours = BlipTokenizer()
    ref = BertTokenizer(vocab_path())
    ref.add_special_tokens({"bos_token": "[DEC]"})
    ref.add_special_tokens({"additional_special_tokens": ["[ENC]"]})
    assert (ours.bos_token_id, ours.enc_token_id, len(ours)) == (30522, 30523, 30524)
    texts = ["A picture of a woman, sitting on the beach!", "Café naïve 北京 résumé", "", "unaffable " * 50,
             "tabs\tand\nnewlines", "[ENC] special [DEC] tokens"]
    ids, mask = ours(texts, max_length=35)
    ref_out = ref(texts, max_length=35, truncation=True, padding="longest", return_tensors="pt")
    assert torch.equal(ids, ref_out.input_ids) and torch.equal(mask, ref_out.attention_mask)
    ids, _ = ours(["a dog"], first_token=ENC_ID)
    assert ids[0, 0] == ENC_ID
    assert ours.decode([DEC_ID, 1037, 3899, 102, 0]) == "a dog"


def test_pre_caption():
    assert pre_caption("  A Dog!! (running)   on: the beach.  ") == "a dog running on the beach"
    assert pre_caption(" ".join(["w"] * 40), max_words=30) == " ".join(["w"] * 30)


def test_cached_decoding_equals_full_forward(captioner):
    torch.manual_seed(0)
    states = captioner.visual_encoder(torch.randn(2, 3, 32, 32))
    ids = torch.randint(1000, 2000, (2, 7))
    ids[:, 0] = DEC_ID
    full = captioner.text_decoder(ids, None, states)
    state = captioner.text_decoder.start(states)
    steps = [state(ids[:, :3])]  # a prompt, then one token at a time
    for t in range(3, 7):
        steps.append(state(ids[:, t:t + 1]))
    assert torch.allclose(steps[0], full[:, 2], atol=1e-5)
    for i, t in enumerate(range(3, 7)):
        assert torch.allclose(steps[i + 1], full[:, t], atol=1e-5)


def test_beams_share_one_copy_of_image_keys(captioner):
    """Rows grouped per image attend exactly like rows given their own copy of the image states."""
    torch.manual_seed(1)
    states = captioner.visual_encoder(torch.randn(2, 3, 32, 32))
    ids = torch.randint(1000, 2000, (6, 5))
    grouped = captioner.text_decoder(ids, None, states)
    copied = captioner.text_decoder(ids, None, states.repeat_interleave(3, 0))
    assert torch.allclose(grouped, copied, atol=1e-5)


@pytest.mark.parametrize("kw", [dict(num_beams=3), dict(num_beams=1), dict(sample=True, top_p=0.9)])
def test_batched_captions_equal_one_by_one(captioner, kw):
    images = [torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(i)) for i in range(5)]
    g = torch.Generator().manual_seed(0) if kw.get("sample") else None
    batched = captioner.caption(torch.cat(images), return_ids=True, generator=g, max_length=15, **kw)
    single = []
    for im in images:
        g = torch.Generator().manual_seed(0) if kw.get("sample") else None
        single += captioner.caption(im, return_ids=True, generator=g, max_length=15, **kw)
    if kw.get("sample"):  # sampling draws differ with the batch; check the shape of the result only
        assert len(batched) == 5 and all(r["ids"][0] == DEC_ID for r in batched)
    else:
        assert [r["ids"] for r in batched] == [r["ids"] for r in single]
        assert len({tuple(r["ids"]) for r in batched}) > 1  # the images really give different captions


def test_caption_accepts_paths_pil_and_odd_images(captioner, tmp_path):
    Image.new("RGB", (1, 1), (200, 10, 10)).save(tmp_path / "dot.png")
    Image.new("L", (50, 20), 128).save(tmp_path / "gray.png")
    Image.new("RGBA", (40, 40), (0, 0, 255, 100)).save(tmp_path / "alpha.png")
    paths = [tmp_path / "dot.png", str(tmp_path / "gray.png"), Image.open(tmp_path / "alpha.png")]
    out = captioner.caption(paths, return_ids=True)
    assert len(out) == 3 and all(r["ids"][:4] == captioner.prompt_ids("a picture of ", 1)[0].tolist() for r in out)
    # the prompt is removed by tokens: the caption never starts with a cut word
    assert all(not r["caption"].startswith("a picture of") for r in out)


def test_prompt_removed_by_tokens_not_characters(captioner):
    """A prompt whose characters differ from its decoded form (double spaces, capitals) must not
    eat into the caption, as the official `decoded[len(prompt):]` cut does."""
    prompt = "A  Picture  of "
    out = captioner.caption(torch.randn(1, 3, 32, 32), prompt=prompt, num_beams=1, max_length=10, return_ids=True)[0]
    full = captioner.tokenizer.decode(out["ids"])
    assert full == ("a picture of " + out["caption"]).strip()
    assert out["caption"] and full[len(prompt):] != out["caption"]  # the character cut would differ


def test_empty_and_very_long_texts(matcher):
    px = torch.randn(1, 3, 32, 32)
    long_text = " ".join(["dog"] * 1000)
    out = matcher.match(px, ["", long_text, "a dog"])
    assert out["itm"].shape == (3,) and torch.isfinite(out["itm"]).all() and torch.isfinite(out["itc"]).all()
    assert ((out["itm"] >= 0) & (out["itm"] <= 1)).all()
    emb = matcher.embed_texts(["", long_text])
    assert emb.shape == (2, 32) and torch.allclose(emb.norm(dim=-1), torch.ones(2), atol=1e-4)
    with pytest.raises(ValueError, match="at least one text"):
        matcher.match(px, [])


def test_match_one_image_many_texts_equals_pairs(matcher):
    px = torch.randn(1, 3, 32, 32)
    texts = ["a dog", "a red car on a street", "two people"]
    one = matcher.match(px, texts)
    pairs = matcher.match(px.expand(3, -1, -1, -1), texts)
    assert torch.allclose(one["itm"], pairs["itm"], atol=1e-5)
    assert torch.allclose(one["itc"], pairs["itc"], atol=1e-5)
    with pytest.raises(ValueError, match="one text per image"):
        matcher.match(torch.randn(2, 3, 32, 32), texts)


def test_embeddings(matcher, hf_dirs):
    px = torch.randn(2, 3, 32, 32)
    img = matcher.embed_images(px)
    assert img.shape == (2, 32) and torch.allclose(img.norm(dim=-1), torch.ones(2), atol=1e-4)
    raw = matcher.embed_images(px, project=False)
    assert raw.shape == (2, 48)
    mm = matcher.embed_multimodal(px, ["a dog", "a cat"])
    assert mm.shape == (2, 64)
    cap = blip.load(hf_dirs["caption"][0])
    with pytest.raises(blip.MissingPartError, match="text encoder"):
        cap.embed_texts(["a dog"])


def test_vqa_rank_and_generate(hf_dirs):
    model = blip.load(hf_dirs["vqa"][0])
    px = torch.randn(1, 3, 32, 32)
    answers = ["yes", "no", "red", "two dogs", "a big blue car"]
    ranked = model.answer(px, ["what color is it?", "is there a dog?"], answer_list=answers, k_test=3)
    assert len(ranked) == 2 and all(a in answers for a in ranked)
    # ranking over all candidates equals scoring each candidate directly (k_test >= len)
    with torch.inference_mode():
        states, mask = model._question_states(px, ["what color is it?"])
        ids, amask = model.tokenizer(answers, first_token=DEC_ID)
        nll = model.text_decoder.lm_loss(ids, amask, states, mask, reduction="none")
    assert model.answer(px, ["what color is it?"], answer_list=answers, k_test=10)[0] == answers[int(nll.argmin())]
    # padding in a batch does not change an answer (the decoder masks question padding)
    alone = model.answer(px, ["what?"], num_beams=2, max_length=6)
    batched = model.answer(px, ["what?", "what is the man on the left holding in his hand?"], num_beams=2, max_length=6)
    assert alone[0] == batched[0]


def test_create_model_tasks_have_their_parts():
    m = blip.create_model("tiny", task="caption")
    assert m.has("text_decoder") and not m.has("text_encoder")
    m = blip.create_model("tiny", task="pretrain")
    assert m.has("text_encoder", "text_decoder", "itm_head", "vision_proj", "temp")
    assert m.text_decoder.cls.predictions.decoder.weight is m.text_decoder.bert.embeddings.word_embeddings.weight
    out = m.caption(torch.randn(2, 3, 64, 64), num_beams=2, max_length=8)
    assert len(out) == 2


def test_missing_or_unknown_device_is_a_clear_error(hf_dirs, tmp_path):
    absent = f"cuda:{torch.cuda.device_count()}"  # one past the last GPU: none on a CPU-only machine
    with pytest.raises(ValueError, match="asked for"):
        blip.create_model("tiny", task="caption", device=absent)
    with pytest.raises(ValueError, match="asked for"):
        blip.load(hf_dirs["caption"][0], device=absent)
    with pytest.raises(ValueError, match="unknown device 'gpu'"):
        blip.load(hf_dirs["caption"][0], device="gpu")
    with pytest.raises(ValueError, match="unknown dtype"):
        blip.load("/no/such/checkpoint", dtype="bf17")  # checked before the weights are looked for
    from blip.train.config import TrainConfig
    from blip.train.loop import Trainer
    with pytest.raises(ValueError, match="asked for"):
        Trainer(TrainConfig.load(None, ["model=tiny", "synthetic_pairs=4", f"device={absent}"]), tmp_path)
