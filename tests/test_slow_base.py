"""Parity on the real `base` shapes (slow: run with `pytest -m slow`)."""
import pytest
import torch

import blip

pytestmark = pytest.mark.slow


def test_base_caption_parity(tmp_path):
    from transformers import BlipConfig, BlipForConditionalGeneration
    torch.manual_seed(0)
    cfg = BlipConfig(text_config=dict(num_attention_heads=12), vision_config=dict(image_size=224, layer_norm_eps=1e-6,
                                                                                 initializer_range=0.02))
    hf = BlipForConditionalGeneration(cfg).eval()
    hf.save_pretrained(str(tmp_path))
    ours = blip.load(tmp_path)
    assert ours.config.text.heads == 12 and ours.config.vision.width == 768
    px = torch.randn(2, 3, 224, 224)
    prompt = ours.prompt_ids("a picture of ", 2)
    with torch.no_grad():
        hv = hf.vision_model(pixel_values=px).last_hidden_state
        ov = ours.encode_image(px)
        assert (hv - ov).abs().max() < 1e-4
        logits_hf = hf.text_decoder(input_ids=prompt, encoder_hidden_states=hv).logits
        logits_ours = ours.text_decoder(prompt, None, ov)
        assert (logits_hf - logits_ours).abs().max() < 1e-4
        ref = hf.generate(pixel_values=px, input_ids=torch.cat([prompt, torch.full((2, 1), 102)], 1),
                          num_beams=3, max_length=20, min_length=5)
    mine, _ = ours.generate_ids(px, num_beams=3, max_length=20, min_length=5, length_normalization="generated")
    width = max(ref.shape[1], mine.shape[1])
    pad = lambda t: torch.nn.functional.pad(t, (0, width - t.shape[1]))  # noqa: E731
    assert torch.equal(pad(ref), pad(mine))
