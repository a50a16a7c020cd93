"""TrainConfig.whiten_stem: a from-scratch conv stem's first convolution whitens the training images' 3x3
patches (train/init_weights.whiten_stem)."""
import pytest
import torch
import torch.nn.functional as F

import blip
from blip.train.config import TrainConfig
from blip.train.init_weights import whiten_stem
from blip.train.loop import Trainer, first_images

pytestmark = pytest.mark.usefixtures("one_thread")


def _conv_tower(stem="conv", **more):
    torch.manual_seed(0)
    return blip.create_model("tiny", task="feature", device="cpu", **{"vision.stem": stem, **more}).visual_encoder


def _correlated_images(n=24, size=32, seed=0):
    """Smooth images whose channels are correlated: their patch covariance is far from the identity."""
    g = torch.Generator().manual_seed(seed)
    base = F.avg_pool2d(torch.randn(n, 1, size, size, generator=g), 5, 1, 2)
    noise = lambda: torch.randn(n, 1, size, size, generator=g)
    return torch.cat([base, 0.8 * base + 0.2 * noise(), -base + 0.3 * noise()], 1) * 3 + 1


# the tiny preset's first convolution has 10 filters (5 pairs); at width 384 it has 64, more than the 27
# patch dimensions give pairs for (27 pairs, 10 filters left as they were)
@pytest.mark.parametrize("stem,more", [("conv", {}), ("patch_conv", {}), ("conv", {"vision.width": 384})])
def test_the_first_filters_whiten_the_patches(stem, more):
    tower = _conv_tower(stem, **more)
    conv = getattr(tower.patch_embed, "conv", tower.patch_embed).stem[0]
    half = min(conv.out_channels // 2, 27)
    untouched = conv.weight[2 * half:].clone()
    images = _correlated_images()
    n = whiten_stem(tower, images, eps=0.0)
    assert n == 2 * half
    with torch.no_grad():
        out = F.conv2d(images.double(), conv.weight[:half].double(), padding=1)
    cov = torch.cov(out.permute(1, 0, 2, 3).reshape(half, -1))
    # unit variance, uncorrelated: the directions the images vary least in are scaled up, not lost
    assert torch.allclose(cov, torch.eye(half, dtype=torch.float64), atol=2e-2)
    # the second half are the same filters negated (a ReLU keeps both signs of every edge)
    assert torch.equal(conv.weight[half:n], -conv.weight[:half])
    assert torch.equal(conv.weight[n:], untouched) and (len(untouched) == 10) == ("vision.width" in more)


def test_a_patch_stem_or_a_loaded_tower_is_refused():
    with pytest.raises(ValueError, match="convolutional stem"):
        whiten_stem(_conv_tower("patch"), _correlated_images())
    with pytest.raises(ValueError, match="from-scratch"):
        TrainConfig.load(None, ["model=tiny", "whiten_stem=true", "init_vision=vit.pth"])


def test_training_starts_from_the_whitened_stem_of_its_first_images(tmp_path):
    args = ["model=tiny", "model_overrides={\"vision.stem\": \"conv\"}", "synthetic_pairs=16", "batch_size=4",
            "queue_size=16", "epochs=1", "steps_per_epoch=1", "progress=false", "ckpt_interval=0", "device=cpu"]
    plain = Trainer(TrainConfig.load(None, args), tmp_path / "plain")
    whitened = Trainer(TrainConfig.load(None, args + ["whiten_stem=true"]), tmp_path / "whitened")
    try:
        first = [t.model.visual_encoder.patch_embed.stem[0].weight.detach().clone() for t in (plain, whitened)]
        assert not torch.equal(*first)
        expected = _conv_tower()
        expected.load_state_dict(plain.model.visual_encoder.state_dict())
        whiten_stem(expected, first_images(plain.dataset))
        assert torch.equal(expected.patch_embed.stem[0].weight, first[1])
        # the momentum tower starts as the whitened one, and the batches do not depend on the whitening
        m = next(p for n, p in whitened.objective.named_parameters() if n.endswith("visual_encoder_m.patch_embed.stem.0.weight"))
        assert torch.equal(m, first[1])
        a, b = (next(iter(t._batches()))["image"] for t in (plain, whitened))
        assert torch.equal(a, b)
    finally:
        plain.close()
        whitened.close()
    assert whitened.train()["finished"]
