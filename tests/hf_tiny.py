"""Tiny random transformers BLIP models, saved to folders: the parity oracle for our loader."""
from __future__ import annotations

import torch

TEXT = dict(vocab_size=30524, hidden_size=64, encoder_hidden_size=48, intermediate_size=128,
            num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=64,
            bos_token_id=30522, sep_token_id=102, pad_token_id=0, hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0, layer_norm_eps=1e-12)
VISION = dict(hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
              image_size=32, patch_size=8, layer_norm_eps=1e-6)

CLASSES = {"caption": "BlipForConditionalGeneration", "retrieval": "BlipForImageTextRetrieval",
           "vqa": "BlipForQuestionAnswering"}


def make_hf(task: str, seed: int = 0, scale: float = 1.0):
    """A random transformers model for `task`; weights scaled up so outputs are not flat."""
    import transformers
    from transformers import BlipConfig
    torch.manual_seed(seed)
    vision = dict(VISION)
    if task == "vqa":  # transformers' answer decoder only works when the two widths agree
        vision.update(hidden_size=TEXT["hidden_size"], intermediate_size=128)
    config = BlipConfig(text_config=dict(TEXT), vision_config=vision, image_text_hidden_size=32)
    model = getattr(transformers, CLASSES[task])(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim >= 2 or "embedding" in name:
                p.normal_(0, 0.02 * scale * (4 if "word_embeddings" in name else 1))
            elif "LayerNorm" in name or "layer_norm" in name or "layernorm" in name:
                if name.endswith("weight"):
                    p.normal_(1.0, 0.1)
                else:
                    p.normal_(0, 0.1)
            else:
                p.normal_(0, 0.05)
        if hasattr(model, "text_decoder"):  # make [SEP] competitive so captions end at varied lengths
            model.text_decoder.cls.predictions.bias[102] += 13.0
    return model


def save_hf(task: str, folder, seed: int = 0, scale: float = 1.0):
    model = make_hf(task, seed, scale)
    model.save_pretrained(str(folder))
    return model
