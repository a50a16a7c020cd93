"""The ViT options for small models from scratch (VisionConfig.stem="conv"/"patch_conv", .pool="max"/
"max_prenorm", .global_context): shapes, what token 0 holds, what the patch tokens hold, checkpoints in our format, and a clear refusal where the official layouts cannot hold them."""
import pytest
import torch

import blip
from blip.checkpoint import CheckpointError, save_blip, save_hf, save_official
from blip.config import get_config
from blip.vit import ConvStem, PatchConvStem, VisionTransformer, grid_codes

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("patch, size", [(8, 64), (16, 64), (2, 8)])
def test_conv_stem_gives_the_patch_grid(patch, size):
    cfg = get_config("tiny", **{"vision.stem": "conv", "vision.patch_size": patch, "vision.image_size": size})
    vit = VisionTransformer(cfg.vision)
    assert isinstance(vit.patch_embed, ConvStem)
    out = vit(torch.randn(3, 3, size, size))
    assert out.shape == (3, 1 + (size // patch) ** 2, cfg.vision.width)


def test_patch_conv_stem_starts_as_the_patch_stem_and_trains_its_conv_branch():
    torch.manual_seed(0)
    cfg = get_config("tiny", **{"vision.stem": "patch_conv"})
    vit = VisionTransformer(cfg.vision)
    plain = VisionTransformer(get_config("tiny").vision)
    assert isinstance(vit.patch_embed, PatchConvStem)
    own = vit.state_dict()
    plain.load_state_dict({k: v for k, v in own.items() if not k.startswith(("patch_embed.conv.", "patch_embed.scale"))})
    x = torch.randn(2, 3, 64, 64)
    vit.eval(), plain.eval()
    with torch.no_grad():
        torch.testing.assert_close(vit(x), plain(x))  # the conv branch starts at zero
    vit.train()
    out = vit(x)
    (out * torch.randn_like(out)).sum().backward()  # (a plain sum of LayerNorm outputs has no gradient)
    assert vit.patch_embed.scale.grad.abs().sum() > 0  # ... and learns from the first step


def test_a_conv_stem_without_transformer_blocks_gives_the_stems_tokens():
    cfg = get_config("tiny", **{"vision.stem": "conv", "vision.depth": 0, "vision.pool": "max_prenorm"})
    vit = VisionTransformer(cfg.vision).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        tokens = vit.patch_embed(x) + vit.pos_embed[:, 1:]
        torch.testing.assert_close(vit(x)[:, 1:], vit.norm(tokens))
        torch.testing.assert_close(vit(x)[:, 0], vit.norm(tokens.amax(1)))
    with pytest.raises(ValueError, match="text.depth"):
        get_config("tiny", **{"text.depth": 0})


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


def test_max_prenorm_pools_the_residual_stream_before_the_final_norm():
    torch.manual_seed(0)
    cls = VisionTransformer(get_config("tiny").vision).eval()
    pre = VisionTransformer(get_config("tiny", **{"vision.pool": "max_prenorm"}).vision).eval()
    pre.load_state_dict(cls.state_dict())
    x = torch.randn(2, 3, 64, 64)
    stream = []
    cls.norm.register_forward_hook(lambda mod, inp, out: stream.append(inp[0]))
    with torch.no_grad():
        a, b = cls(x), pre(x)
    torch.testing.assert_close(b[:, 1:], a[:, 1:])
    torch.testing.assert_close(b[:, 0], cls.norm(stream[0][:, 1:].amax(1)))
    assert not torch.allclose(b[:, 0], a[:, 1:].amax(1))  # not the same as max after the norm


def test_global_context_adds_token_0_to_every_patch_token():
    torch.manual_seed(0)
    plain = VisionTransformer(get_config("tiny", **{"vision.pool": "max_prenorm"}).vision).eval()
    ctx = VisionTransformer(get_config("tiny", **{"vision.pool": "max_prenorm", "vision.global_context": True}).vision)
    ctx.load_state_dict(plain.state_dict())  # no parameters of its own
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        a, b = plain(x), ctx.eval()(x)
    torch.testing.assert_close(b[:, 0], a[:, 0])  # ITC's feature is unchanged
    torch.testing.assert_close(b[:, 1:], a[:, 1:] + a[:, :1])
    with pytest.raises(ValueError, match="global_context"):
        get_config("tiny", **{"vision.global_context": True})  # with [CLS] there is no pooled token to add


def test_grid_codes_add_a_distinct_fixed_code_to_each_patch_token():
    torch.manual_seed(0)
    opts = {"vision.pool": "max_prenorm", "vision.global_context": True}
    plain = VisionTransformer(get_config("tiny", **opts).vision).eval()
    coded = VisionTransformer(get_config("tiny", **opts, **{"vision.grid_codes": True}).vision).eval()
    coded.load_state_dict(plain.state_dict())  # no parameters of its own
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        a, b = plain(x), coded(x)
    torch.testing.assert_close(b[:, 0], a[:, 0])  # ITC's feature is unchanged
    codes = grid_codes(4, a.shape[-1])  # tiny: 64 px, patch 16
    torch.testing.assert_close(b[:, 1:], a[:, 1:] + codes)
    assert torch.cdist(codes, codes).add(torch.eye(16) * 1e3).min() > 0.5  # every grid cell tells apart
    # row r, column c: the row's half of the code depends on r only, the column's on c only
    k = a.shape[-1] // 2
    grid = codes.view(4, 4, -1)
    torch.testing.assert_close(grid[:, 0, :k], grid[:, 3, :k])
    torch.testing.assert_close(grid[0, :, k:], grid[3, :, k:])
    assert not torch.allclose(grid[0, 0, :k], grid[1, 0, :k]) and not torch.allclose(grid[0, 0, k:], grid[0, 1, k:])


def test_conv_stem_model_round_trips_in_our_format_and_is_refused_by_the_official_ones(tmp_path):
    torch.manual_seed(0)
    model = blip.create_model("tiny", task="pretrain", device="cpu", **{"vision.stem": "conv", "vision.pool": "max_prenorm",
                                                                       "vision.global_context": True})
    model.train()
    model.visual_encoder(torch.randn(4, 3, 64, 64))  # BatchNorm's running statistics move off their init
    model.eval()
    loaded = blip.load(save_blip(model, tmp_path / "m"), device="cpu").eval()
    assert loaded.config.vision.stem == "conv" and loaded.config.vision.pool == "max_prenorm"
    assert loaded.config.vision.global_context
    images = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(loaded.embed_images(images), model.embed_images(images))
    for save in (lambda: save_official(model, tmp_path / "o.pth"), lambda: save_hf(model, tmp_path / "hf")):
        with pytest.raises(CheckpointError, match="global_context"):
            save()
    plain = blip.create_model("tiny", task="pretrain", device="cpu", **{"vision.global_context": True,
                                                                       "vision.pool": "max"})
    with pytest.raises(CheckpointError, match="global_context=True"):
        save_official(plain, tmp_path / "p.pth")
    coded = blip.create_model("tiny", task="pretrain", device="cpu", **{"vision.grid_codes": True})
    with pytest.raises(CheckpointError, match="grid_codes=True"):
        save_hf(coded, tmp_path / "c")
