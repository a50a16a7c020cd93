"""The ViT options for small models from scratch (VisionConfig.stem="conv", .pool="max"): shapes, what
token 0 holds, checkpoints in our format, and a clear refusal where the official layouts cannot hold them."""
import pytest
import torch

import blip
from blip.checkpoint import CheckpointError, save_blip, save_hf, save_official
from blip.config import get_config
from blip.vit import ConvStem, VisionTransformer

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("patch, size", [(8, 64), (16, 64), (2, 8)])
def test_conv_stem_gives_the_patch_grid(patch, size):
    cfg = get_config("tiny", **{"vision.stem": "conv", "vision.patch_size": patch, "vision.image_size": size})
    vit = VisionTransformer(cfg.vision)
    assert isinstance(vit.patch_embed, ConvStem)
    out = vit(torch.randn(3, 3, size, size))
    assert out.shape == (3, 1 + (size // patch) ** 2, cfg.vision.width)


def test_bad_vision_options_are_refused():
    with pytest.raises(ValueError, match="power-of-two"):
        get_config("tiny", **{"vision.stem": "conv", "vision.patch_size": 12, "vision.image_size": 48})
    with pytest.raises(ValueError, match="vision.stem"):
        get_config("tiny", **{"vision.stem": "resnet"})
    with pytest.raises(ValueError, match="vision.pool"):
        get_config("tiny", **{"vision.pool": "mean"})


def test_max_pool_puts_the_patch_tokens_channel_max_in_token_0():
    torch.manual_seed(0)
    cls = VisionTransformer(get_config("tiny").vision).eval()
    mx = VisionTransformer(get_config("tiny", **{"vision.pool": "max"}).vision).eval()
    mx.load_state_dict(cls.state_dict())
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        a, b = cls(x), mx(x)
    torch.testing.assert_close(b[:, 1:], a[:, 1:])
    torch.testing.assert_close(b[:, 0], a[:, 1:].amax(1))
    assert not torch.allclose(b[:, 0], a[:, 0])


def test_conv_stem_model_round_trips_in_our_format_and_is_refused_by_the_official_ones(tmp_path):
    torch.manual_seed(0)
    model = blip.create_model("tiny", task="pretrain", device="cpu", **{"vision.stem": "conv", "vision.pool": "max"})
    model.train()
    model.visual_encoder(torch.randn(4, 3, 64, 64))  # BatchNorm's running statistics move off their init
    model.eval()
    loaded = blip.load(save_blip(model, tmp_path / "m"), device="cpu").eval()
    assert loaded.config.vision.stem == "conv" and loaded.config.vision.pool == "max"
    images = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(loaded.embed_images(images), model.embed_images(images))
    for save in (lambda: save_official(model, tmp_path / "o.pth"), lambda: save_hf(model, tmp_path / "hf")):
        with pytest.raises(CheckpointError, match="stem"):
            save()
