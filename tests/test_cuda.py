"""What a user with a GPU gets for free: the same model on "cuda" gives the CPU's answers, its fast decoding
paths equal the plain recompute there, the half-precision policies and a training step run. Skipped on
machines without CUDA (the rest of the suite pins itself to the CPU, see conftest)."""
import json

import pytest
import torch

import blip
from test_fast_paths import DECODING_CASES, check_cached_equals_plain

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]
TOL = 1e-3


@pytest.fixture(autouse=True)
def _full_fp32(monkeypatch):
    """Compare real fp32 with the CPU: no TF32 matmuls or convolutions in these tests."""
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)


def _pixels(n, seed=0):
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def test_caption_model_on_cuda_matches_the_cpu(hf_dirs):
    folder = hf_dirs["caption"][0]
    cpu, gpu = blip.load(folder, device="cpu"), blip.load(folder, device="cuda")
    assert gpu.device.type == "cuda" and all(p.is_cuda for p in gpu.parameters())
    px = _pixels(4, seed=1)
    with torch.inference_mode():
        s_cpu, s_gpu = cpu.visual_encoder(px), gpu.visual_encoder(px.cuda())
        assert (s_cpu - s_gpu.cpu()).abs().max() < TOL
        ids = cpu.prompt_ids("a picture of ", 4)
        l_cpu, l_gpu = cpu.text_decoder(ids, None, s_cpu), gpu.text_decoder(ids.cuda(), None, s_gpu)
        assert (l_cpu - l_gpu.cpu()).abs().max() < TOL
    for kw in (dict(num_beams=3), dict(num_beams=1)):
        mine = gpu.caption(px, max_length=12, min_length=3, **kw)
        assert mine == cpu.caption(px, max_length=12, min_length=3, **kw)
        assert len(mine) == 4


@pytest.mark.parametrize("absorb", [False, True])
@pytest.mark.parametrize("cfg", DECODING_CASES)
def test_cached_decoding_on_cuda_equals_plain_recompute(hf_dirs, cfg, absorb):
    model = blip.load(hf_dirs["caption"][0], device="cuda")
    assert check_cached_equals_plain(model, _pixels(5), cfg, absorb).is_cuda


def test_cuda_decodes_through_projected_cross_attention(hf_dirs):
    """The absorbed cross-attention pays on the CPU only (slower on an H100 at every size measured)."""
    model = blip.load(hf_dirs["caption"][0], device="cuda")
    assert not model.text_decoder.absorb_pays(1, 1)
    assert blip.load(hf_dirs["caption"][0], device="cpu").text_decoder.absorb_pays(1, 1)


def test_sampling_generator_on_cuda(hf_dirs):
    model = blip.load(hf_dirs["caption"][0], device="cuda")
    px = _pixels(3)
    draw = lambda g: model.generate_ids(px, sample=True, num_beams=1, max_length=12, generator=g)[0]  # noqa: E731
    a = draw(torch.Generator(device="cuda").manual_seed(7))
    assert torch.equal(a, draw(torch.Generator(device="cuda").manual_seed(7)))
    with pytest.raises(ValueError, match="generator is on cpu"):
        draw(torch.Generator().manual_seed(7))


def test_match_and_embeddings_on_cuda_match_the_cpu(hf_dirs):
    folder = hf_dirs["retrieval"][0]
    cpu, gpu = blip.load(folder, device="cpu"), blip.load(folder, device="cuda")
    px = _pixels(2, seed=3)
    texts = ["a picture of a dog", "two cats playing", ""]
    a, b = cpu.match(px[:1], texts), gpu.match(px[:1], texts)
    for key in ("itm", "itc"):
        assert b[key].is_cuda and (a[key] - b[key].cpu()).abs().max() < TOL
    assert (cpu.embed_images(px) - gpu.embed_images(px).cpu()).abs().max() < TOL
    assert (cpu.embed_texts(texts) - gpu.embed_texts(texts).cpu()).abs().max() < TOL


@pytest.mark.parametrize("dtype", ["bf16", "bf16-full", "fp16"])
def test_half_precision_on_cuda_runs_and_stays_close(hf_dirs, dtype):
    fp32 = blip.load(hf_dirs["retrieval"][0], device="cpu")
    half = blip.load(hf_dirs["retrieval"][0], device="cuda", dtype=dtype)
    px = _pixels(3, seed=4)
    cos = torch.nn.functional.cosine_similarity(fp32.embed_images(px), half.embed_images(px).float().cpu())
    assert cos.min() > 0.99
    out = half.match(px[:1], ["a dog", "a cat"])
    assert torch.allclose(out["itm"].float().cpu(), fp32.match(px[:1], ["a dog", "a cat"])["itm"], atol=0.05)
    cap = blip.load(hf_dirs["caption"][0], device="cuda", dtype=dtype)
    for kw in (dict(num_beams=3), dict(num_beams=1), dict(sample=True)):
        assert len(cap.caption(px, max_length=10, **kw)) == 3


def test_pretraining_steps_on_cuda_with_bf16_autocast(tmp_path):
    from blip.train.config import TrainConfig
    from blip.train.loop import Trainer
    cfg = TrainConfig.load(None, ["model=tiny", "synthetic_pairs=12", "batch_size=4", "queue_size=16",
                                  "warmup_steps=2", "init_lr=1e-3", "progress=false", "log_interval=1",
                                  "ckpt_interval=0", "seed=3", "device=cuda", "bf16=true", "epochs=1"])
    trainer = Trainer(cfg, tmp_path)
    assert next(trainer.model.parameters()).is_cuda
    before = trainer.model.visual_encoder.cls_token.detach().clone()
    result = trainer.train()
    assert result["global_step"] == 3
    log = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in log)
    assert not torch.equal(before, trainer.model.visual_encoder.cls_token.detach())
    exported = blip.load(tmp_path / "model", task="pretrain", device="cuda")
    assert torch.equal(exported.visual_encoder.cls_token, trainer.model.visual_encoder.cls_token.detach())


def test_cli_runs_on_cuda(hf_dirs, tmp_path, capsys):
    from PIL import Image

    from blip.cli import main
    img = tmp_path / "red.png"
    Image.new("RGB", (40, 30), (200, 30, 30)).save(img)
    assert main(["caption", str(img), "--model", str(hf_dirs["caption"][0]), "--device", "cuda", "--json",
                 "--max-length", "8"]) == 0
    assert "red.png" in capsys.readouterr().out
