"""Grad-CAM grounding (blip.grounding): against a direct autograd computation, and the CLI."""
import json

import pytest
import torch
from PIL import Image, ImageDraw

import blip
from blip import med
from blip.cli import main
from blip.grounding import gradcam, heat_png, overlay, peak
from blip.tokenizer import ENC_ID

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model():
    """A tiny retrieval model with weights far from BERT's 0.02 init, so the maps are not flat."""
    torch.manual_seed(0)
    m = blip.create_model("tiny", task="retrieval", **{"text.depth": 3}).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.2 * torch.randn_like(p))
    return m


@pytest.fixture(scope="module")
def image():
    img = Image.new("RGB", (72, 64), (150, 150, 150))
    d = ImageDraw.Draw(img)
    d.ellipse([5, 5, 25, 25], fill=(220, 40, 40))
    d.rectangle([40, 35, 65, 60], fill=(40, 80, 220))
    return img


def _reference(model, image, text, block):
    """attention * relu(d logit / d attention) with every cross-attention materialised by hand."""
    ids, mask = model._texts([text], 35, ENC_ID)
    recorded = []

    def explicit(q, k, v, mask_, dropout_p):
        p = ((q @ k.transpose(-1, -2)) / q.shape[-1] ** 0.5).softmax(-1)
        recorded.append(p)
        return p @ v

    with torch.no_grad():
        states = model.visual_encoder(model.pixels(image))
    patch = pytest.MonkeyPatch()
    patch.setattr(med, "grouped_attention", explicit)
    try:
        with torch.enable_grad():
            logit = model.itm_logits(states, ids, mask)[0, 1]
            (grad,) = torch.autograd.grad(logit, recorded[block])
    finally:
        patch.undo()
    n = ids.shape[1] - 2
    cam = (recorded[block] * grad.clamp(min=0)).mean(1)[0, 1:1 + n, 1:]
    return cam.detach().reshape(n, 4, 4)


def test_gradcam_matches_direct_computation(model, image):
    text = "a red circle next to a bluish star"
    res = gradcam(model, image, text, block=1)
    ref = _reference(model, image, text, block=1)
    assert ref.abs().max() > 0
    torch.testing.assert_close(res["token_cams"], ref, rtol=1e-4, atol=1e-7)
    # words: word pieces merged, a word's map the mean of its pieces', the text's the mean of all
    assert res["tokens"] == ["a", "red", "circle", "next", "to", "a", "blu", "##ish", "star"]
    assert res["words"] == ["a", "red", "circle", "next", "to", "a", "bluish", "star"]
    bluish = ref[6:8].mean(0)
    torch.testing.assert_close(res["word_maps"][6], (bluish - bluish.min()) / (bluish.max() - bluish.min()),
                               rtol=1e-4, atol=1e-5)
    whole = ref.mean(0)
    torch.testing.assert_close(res["text_map"], (whole - whole.min()) / (whole.max() - whole.min()),
                               rtol=1e-4, atol=1e-5)


def test_shapes_ranges_and_itm(model, image):
    res = gradcam(model, image, "a reddish hexagon")
    assert res["block"] == 1 and res["grid"] == (4, 4)  # depth 3 -> block 1
    assert res["words"] == ["a", "reddish", "hexagon"] and len(res["tokens"]) == 5
    assert res["word_maps"].shape == (3, 4, 4) and res["text_map"].shape == (4, 4)
    for m in (*res["word_maps"], res["text_map"]):
        assert m.dtype == torch.float32 and float(m.min()) == 0.0 and float(m.max()) == pytest.approx(1.0)
    assert res["itm"] == pytest.approx(float(model.match(image, "a reddish hexagon")["itm"][0]), abs=1e-5)
    with pytest.raises(ValueError, match="block must be in 0..2"):
        gradcam(model, image, "a dog", block=3)


def test_normal_forward_unchanged(model, image):
    ids, mask = model._texts(["a red circle"], 35, ENC_ID)
    states = model.encode_image(image)
    with torch.inference_mode():
        before = model.itm_logits(states, ids, mask)
    gradcam(model, image, "a red circle")
    assert getattr(med._probe, "target", None) is None
    with torch.inference_mode():
        after = model.itm_logits(states, ids, mask)
        assert torch.equal(before, after)
        with med.record_cross_attention(model.text_encoder.layers[1].crossattention.self) as probs:
            probed = model.itm_logits(states, ids, mask)
    assert len(probs) == 1 and probs[0].shape == (1, 2, ids.shape[1], 17)
    torch.testing.assert_close(probed, before, rtol=1e-5, atol=1e-6)


def test_overlay_and_png(model, image):
    heat = torch.zeros(4, 4)
    heat[0, 0] = 1.0
    assert peak(heat) == (0, 0)
    out = overlay(image, heat, alpha=0.5)
    assert out.size == image.size and out.mode == "RGB"
    assert overlay(image, heat, alpha=0.0).tobytes() == image.tobytes()
    hot, cold = out.getpixel((2, 2)), out.getpixel((70, 62))  # jet: red where hot, blue where cold
    assert hot[0] > cold[0] and cold[2] > hot[2] - 60
    png = heat_png(image, heat)
    assert png[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_writes_pngs(image, tmp_path, capsys):
    path = tmp_path / "img.png"
    image.save(path)
    out = tmp_path / "heat.png"
    rc = main(["ground", str(path), "--text", "a red circle", "--model", "tiny", "--out", str(out),
               "--per-word", "--json"])
    record = json.loads(capsys.readouterr().out)
    assert rc == 0 and 0 <= record["itm"] <= 1 and record["grid"] == [4, 4]
    assert record["peak"] == record["files"][0]["peak"] and all(0 <= v < 4 for v in record["peak"])
    assert [f["word"] for f in record["files"]] == [None, "a", "red", "circle"]
    for f in record["files"]:
        assert Image.open(f["path"]).size == image.size
    assert (tmp_path / "heat_02_circle.png").is_file()
    rc = main(["ground", str(path), "--text", "a red circle", "--model", "tiny", "--out", str(out), "--word", "dog"])
    assert rc == 2 and "not a word of the text" in capsys.readouterr().err


def _saliency_reference(model, image, text, drop=()):
    """relu(sum_c grad * input) on the patch tokens, for the ITM match logit, with the token positions in
    `drop` left out of the text's attention mask."""
    ids, mask = model._texts([text], 35, ENC_ID)
    mask = mask.clone()
    mask[0, list(drop)] = 0
    with torch.no_grad():
        states = model.visual_encoder(model.pixels(image))
    states.requires_grad_()
    with torch.enable_grad():
        (grad,) = torch.autograd.grad(model.itm_logits(states, ids, mask)[0, 1], states)
    return (grad * states.detach())[0, 1:].sum(-1).clamp(min=0).view(4, 4)


def _minmax(x):
    return (x - x.min()) / (x.max() - x.min())


def test_saliency_matches_direct_computation(model, image):
    text = "a red circle next to a bluish star"
    res = gradcam(model, image, text, method="saliency")
    assert res["method"] == "saliency" and res["block"] is None and "token_cams" not in res
    whole = _saliency_reference(model, image, text)
    assert whole.max() > 0
    torch.testing.assert_close(res["text_map"], _minmax(whole), rtol=1e-4, atol=1e-5)
    # a word's map: what the text's map loses without it ("bluish" = pieces 7 and 8 after [ENC])
    lost = (whole - _saliency_reference(model, image, text, drop=(7, 8))).clamp(min=0)
    assert lost.max() > 0
    torch.testing.assert_close(res["word_maps"][6], _minmax(lost), rtol=1e-3, atol=1e-4)
    assert res["word_maps"].shape == (8, 4, 4)
    assert res["itm"] == pytest.approx(float(model.match(image, text)["itm"][0]), abs=1e-5)
    with pytest.raises(ValueError, match="method must be one of"):
        gradcam(model, image, text, method="cam")


def test_auto_method_follows_the_towers_global_context(image, tmp_path, capsys):
    torch.manual_seed(0)
    m = blip.create_model("tiny", task="retrieval", **{"vision.global_context": True, "vision.pool": "max"}).eval()
    assert gradcam(m, image, "a red circle")["method"] == "saliency"
    assert gradcam(m, image, "a red circle", block=0)["method"] == "gradcam"  # a layer asked for: Grad-CAM
    with pytest.raises(ValueError, match="block picks"):
        gradcam(m, image, "a red circle", block=0, method="saliency")
    assert gradcam(blip.create_model("tiny", task="retrieval").eval(), image, "a red circle")["method"] == "gradcam"
    path, out = tmp_path / "img.png", tmp_path / "heat.png"
    image.save(path)
    assert main(["ground", str(path), "--text", "a red circle", "--model", "tiny", "--out", str(out),
                 "--method", "saliency", "--json"]) == 0
    record = json.loads(capsys.readouterr().out)
    assert record["method"] == "saliency" and record["block"] is None and out.is_file()
