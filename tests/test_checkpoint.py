"""Every way weights get in and out: official .pth, transformers folders, our format, conversion."""
import json
import pickle

import pytest
import torch

import blip
from blip.checkpoint import CheckpointError, hf_to_official, official_to_hf, read_checkpoint


def _official_pth(hf, path, extra=None):
    """The inverse of transformers' published key mapping: an official-layout checkpoint."""
    sd = {hf_to_official(k): v.clone() for k, v in hf.state_dict().items()}
    sd.update(extra or {})
    torch.save({"model": sd, "epoch": 3}, path)
    return sd


def test_key_mapping_round_trip():
    keys = ["visual_encoder.cls_token", "visual_encoder.pos_embed", "visual_encoder.patch_embed.proj.weight",
            "visual_encoder.blocks.11.attn.qkv.bias", "visual_encoder.blocks.0.attn.proj.weight",
            "visual_encoder.blocks.3.norm1.weight", "visual_encoder.blocks.3.norm2.bias",
            "visual_encoder.blocks.3.mlp.fc1.weight", "visual_encoder.norm.weight", "text_encoder.embeddings.word_embeddings.weight"]
    hf = [official_to_hf(k) for k in keys]
    assert hf[0] == "vision_model.embeddings.class_embedding"
    assert hf[3] == "vision_model.encoder.layers.11.self_attn.qkv.bias"
    assert hf[4] == "vision_model.encoder.layers.0.self_attn.projection.weight"
    assert hf[8] == "vision_model.post_layernorm.weight"
    assert [hf_to_official(k) for k in hf] == keys


@pytest.mark.parametrize("task", ["caption", "retrieval", "vqa"])
def test_official_pth_loads_with_same_outputs(hf_dirs, tmp_path, task):
    folder, hf = hf_dirs[task]
    # the official layout also carries training state; it must be set aside, not fail the load
    extra = {"temp": torch.tensor(0.05)} if task == "retrieval" else {}
    _official_pth(hf, tmp_path / "m.pth", extra)
    ref = blip.load(folder)
    model = blip.load(tmp_path / "m.pth", config=ref.config)
    assert model.config.task == task
    px = torch.randn(2, 3, 32, 32)
    assert torch.allclose(model.encode_image(px), ref.encode_image(px), atol=1e-6)
    for (k, a), (k2, b) in zip(sorted(model.state_dict().items()), sorted(ref.state_dict().items())):
        if k != "temp":
            assert k == k2 and torch.equal(a, b), k


def test_official_shapes_inferred_and_pos_embed_interpolated(hf_dirs, tmp_path):
    folder, hf = hf_dirs["caption"]
    _official_pth(hf, tmp_path / "m.pth")
    config, sd = read_checkpoint(tmp_path / "m.pth")
    assert config.task == "caption"
    assert (config.vision.width, config.vision.depth, config.vision.patch_size, config.vision.image_size) == (48, 2, 8, 32)
    assert (config.text.width, config.text.depth, config.cross_width) == (64, 2, 48)
    bigger = blip.load(tmp_path / "m.pth", config={"vision.image_size": 64, "text.heads": 4})
    assert bigger.visual_encoder.pos_embed.shape[1] == 1 + 64
    assert any("interpolated" in n for n in bigger.load_report.notes())
    assert bigger.encode_image(torch.randn(1, 3, 64, 64)).shape == (1, 65, 48)


def test_training_state_set_aside_and_reported(hf_dirs, tmp_path):
    folder, hf = hf_dirs["retrieval"]
    extra = {"image_queue": torch.randn(32, 64), "text_queue": torch.randn(32, 64),
             "visual_encoder_m.cls_token": torch.zeros(1, 1, 48), "idx_queue": torch.zeros(1, 64)}
    _official_pth(hf, tmp_path / "m.pth", extra)
    model = blip.load(tmp_path / "m.pth", config=blip.load(folder).config)
    assert len(model.load_report.training_only) == 4
    assert "training-only" in " ".join(model.load_report.notes())


def test_problems_reported_in_one_message(hf_dirs, tmp_path):
    folder, hf = hf_dirs["retrieval"]
    sd = {hf_to_official(k): v for k, v in hf.state_dict().items()}
    del sd["itm_head.bias"]
    sd["surprise.weight"] = torch.zeros(3)
    sd["text_proj.weight"] = torch.zeros(7, 64)
    torch.save({"model": sd}, tmp_path / "bad.pth")
    with pytest.raises(CheckpointError) as err:
        blip.load(tmp_path / "bad.pth", config=blip.load(folder).config)
    msg = str(err.value)
    assert "missing 1: itm_head.bias" in msg and "unexpected 1: surprise.weight" in msg and "wrong shape 1" in msg
    model = blip.load(tmp_path / "bad.pth", config=blip.load(folder).config, strict=False)
    assert model.config.task == "retrieval"


def test_our_format_round_trip(hf_dirs, tmp_path):
    from blip.checkpoint import save_blip
    folder, _ = hf_dirs["vqa"]
    model = blip.load(folder)
    save_blip(model, tmp_path / "ours")
    assert json.loads((tmp_path / "ours" / "config.json").read_text())["format"] == "blip"
    again = blip.load(tmp_path / "ours")
    assert again.config == model.config
    for (k, a), (_, b) in zip(model.state_dict().items(), again.state_dict().items()):
        assert torch.equal(a, b), k
    # tied weights stay tied after a round trip
    dec = again.text_decoder
    assert dec.cls.predictions.decoder.weight is dec.bert.embeddings.word_embeddings.weight


def test_convert_to_hf_loads_in_transformers(hf_dirs, tmp_path):
    import transformers
    from blip.cli import main
    folder, hf = hf_dirs["caption"]
    px = torch.randn(1, 3, 32, 32)
    assert main(["convert", str(folder), str(tmp_path / "hf2"), "--to", "hf"]) == 0
    back2 = transformers.BlipForConditionalGeneration.from_pretrained(str(tmp_path / "hf2")).eval()
    ids = torch.tensor([[30522, 1037, 3861, 1997]])
    with torch.no_grad():
        a = back2(pixel_values=px, input_ids=ids).logits
        b = hf(pixel_values=px, input_ids=ids).logits
    assert torch.allclose(a, b, atol=1e-5)


def test_convert_official_round_trip(hf_dirs, tmp_path):
    from blip.cli import main
    folder, _ = hf_dirs["retrieval"]
    assert main(["convert", str(folder), str(tmp_path / "o.pth"), "--to", "official"]) == 0
    obj = torch.load(tmp_path / "o.pth", weights_only=True)
    assert "visual_encoder.blocks.0.attn.qkv.weight" in obj["model"]
    model = blip.load(tmp_path / "o.pth", config=blip.load(folder).config)
    px = torch.randn(1, 3, 32, 32)
    assert torch.allclose(model.embed_images(px), blip.load(folder).embed_images(px), atol=1e-6)


class Evil:
    def __reduce__(self):
        return (print, ("pwned",))


def test_pickles_are_never_executed(tmp_path, capsys):
    with open(tmp_path / "evil.pth", "wb") as f:
        pickle.dump({"model": Evil()}, f)
    with pytest.raises(CheckpointError, match="weights-only"):
        blip.load(tmp_path / "evil.pth")
    assert "pwned" not in capsys.readouterr().out


def test_missing_path_and_garbage_files(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        blip.load(tmp_path / "nope.pth")
    (tmp_path / "garbage.pth").write_bytes(b"not a checkpoint at all")
    with pytest.raises(CheckpointError):
        blip.load(tmp_path / "garbage.pth")
    (tmp_path / "garbage.safetensors").write_bytes(b"\x00" * 20)
    with pytest.raises(CheckpointError):
        blip.load(tmp_path / "garbage.safetensors")
    torch.save({"model": {"foo.weight": torch.zeros(2)}}, tmp_path / "foreign.pth")
    with pytest.raises(CheckpointError, match="not a BLIP checkpoint"):
        blip.load(tmp_path / "foreign.pth")
    with pytest.raises(CheckpointError, match="preset"):
        blip.load("tiny")


def test_wrong_kind_of_checkpoint(hf_dirs):
    folder, _ = hf_dirs["caption"]
    model = blip.load(folder)
    with pytest.raises(blip.MissingPartError, match="retrieval or pretrained"):
        model.match(torch.randn(1, 3, 32, 32), ["a dog"])
    with pytest.raises(blip.MissingPartError, match="VQA checkpoint"):
        model.answer(torch.randn(1, 3, 32, 32), ["what?"])
    # asking for a task whose parts the checkpoint lacks fails at load, naming what is missing
    with pytest.raises(CheckpointError, match="missing"):
        blip.load(folder, task="retrieval")
    retrieval = blip.load(hf_dirs["retrieval"][0])
    with pytest.raises(blip.MissingPartError, match="captioning"):
        retrieval.caption(torch.randn(1, 3, 32, 32))


def test_hub_id_offline_is_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    with pytest.raises(CheckpointError, match="hub id"):
        blip.load("Salesforce/blip-image-captioning-base")


def test_sharded_transformers_folders_load(hf_dirs, tmp_path):
    """transformers shards past max_shard_size (safetensors with an index); 4.x wrote .bin shards the same way."""
    folder, hf = hf_dirs["caption"]
    ref = blip.load(folder)
    hf.save_pretrained(str(tmp_path / "st"), max_shard_size="100KB")
    assert len(list((tmp_path / "st").glob("*.safetensors"))) > 2
    # .bin shards + pytorch_model.bin.index.json, as transformers 4.x saved without safetensors
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "config.json").write_text((folder / "config.json").read_text())
    sd = hf.state_dict()
    keys = sorted(sd)
    weight_map = {}
    for i, part in enumerate((keys[: len(keys) // 2], keys[len(keys) // 2:])):
        name = f"pytorch_model-0000{i + 1}-of-00002.bin"
        torch.save({k: sd[k].clone() for k in part}, tmp_path / "bin" / name)
        weight_map.update({k: name for k in part})
    index = {"metadata": {}, "weight_map": weight_map}
    (tmp_path / "bin" / "pytorch_model.bin.index.json").write_text(json.dumps(index))
    px = torch.randn(2, 3, 32, 32)
    for sub in ("st", "bin"):
        model = blip.load(tmp_path / sub)
        for (k, a), (k2, b) in zip(sorted(model.state_dict().items()), sorted(ref.state_dict().items())):
            assert k == k2 and torch.equal(a, b), (sub, k)
        assert model.caption(px, num_beams=1) == ref.caption(px, num_beams=1)
    # a shard the index names but the folder lacks is named in the error
    (tmp_path / "bin" / "pytorch_model-00002-of-00002.bin").unlink()
    with pytest.raises(CheckpointError, match="pytorch_model-00002-of-00002.bin"):
        blip.load(tmp_path / "bin")


@pytest.fixture
def http_server(tmp_path):
    """A local HTTP server over tmp_path/www; `/cut/NAME` announces NAME's full length but sends half."""
    import functools
    import http.server
    import threading
    root = tmp_path / "www"
    root.mkdir()

    class Handler(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_GET(self):
            if self.path.startswith("/cut/"):
                body = (root / self.path[len("/cut/"):]).read_bytes()
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body[: len(body) // 2])
                self.close_connection = True
                return
            super().do_GET()

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Handler, directory=str(root)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield root, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_url_download_cached_verified_and_never_half_kept(hf_dirs, tmp_path, monkeypatch, http_server):
    from hf_tiny import make_hf

    from blip.pretrained import url_cache_path
    root, base = http_server
    monkeypatch.setenv("BLIP_CACHE", str(tmp_path / "cache"))
    folder, hf = hf_dirs["caption"]
    ref = blip.load(folder)
    (root / "v1").mkdir()
    (root / "v2").mkdir()
    _official_pth(hf, root / "v1" / "model.pth")
    _official_pth(make_hf("caption", seed=7, scale=5.0), root / "v2" / "model.pth")
    m1 = blip.load(f"{base}/v1/model.pth", config=ref.config)
    assert url_cache_path(f"{base}/v1/model.pth").is_file()
    px = torch.randn(1, 3, 32, 32)
    assert torch.equal(m1.encode_image(px), ref.encode_image(px))
    # the same file name under another URL is another download, not the first one's cache
    m2 = blip.load(f"{base}/v2/model.pth", config=ref.config)
    assert not torch.equal(m2.encode_image(px), m1.encode_image(px))
    (root / "v1" / "model.pth").unlink()  # served from the cache now
    assert torch.equal(blip.load(f"{base}/v1/model.pth", config=ref.config).encode_image(px), ref.encode_image(px))
    with pytest.raises(CheckpointError, match="could not download .*404"):
        blip.load(f"{base}/missing.pth")
    # a connection cut short is an error, and leaves no file (nor temporary file) to be trusted later
    with pytest.raises(CheckpointError, match="could not download"):
        blip.load(f"{base}/cut/v2/model.pth")
    cut = url_cache_path(f"{base}/cut/v2/model.pth")
    assert not cut.exists() and not list(cut.parent.glob("*"))


@pytest.mark.parametrize("weights", ["safetensors", "bin"])
def test_hub_id_from_the_hub_cache(hf_dirs, tmp_path, monkeypatch, weights):
    """A hub id resolves through huggingface_hub's own cache (offline here): the repository layout
    transformers publishes, with safetensors, or only pytorch_model.bin as older repositories."""
    import shutil

    import huggingface_hub.constants as hub
    folder, hf = hf_dirs["caption"]
    snapshot = tmp_path / "hub" / "models--someone--blip-tiny" / "snapshots" / ("a" * 40)
    snapshot.mkdir(parents=True)
    (snapshot.parent.parent / "refs").mkdir()
    (snapshot.parent.parent / "refs" / "main").write_text("a" * 40)
    shutil.copy(folder / "config.json", snapshot / "config.json")
    if weights == "safetensors":
        shutil.copy(folder / "model.safetensors", snapshot / "model.safetensors")
    else:
        torch.save(hf.state_dict(), snapshot / "pytorch_model.bin")
    monkeypatch.setattr(hub, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(hub, "HF_HUB_OFFLINE", True)
    model, ref = blip.load("someone/blip-tiny"), blip.load(folder)
    px = torch.randn(2, 3, 32, 32)
    assert model.config.task == "caption" and model.caption(px, num_beams=1) == ref.caption(px, num_beams=1)
    with pytest.raises(CheckpointError, match="hub id 'someone/other'"):
        blip.load("someone/other")


def test_cold_load_and_caption_do_not_import_dynamo(hf_dirs):
    """A cold `blip caption` stays quick: building the model on the meta device must not run
    `normal_` there (it imports torch._dynamo, 1.2-1.8 s on this VM, against ~0.25 s for the load)."""
    import subprocess
    import sys
    code = ("import sys, torch, blip\n"
            f"m = blip.load({str(hf_dirs['caption'][0])!r}, device='cpu')\n"
            "m.caption(torch.randn(1, 3, 32, 32), num_beams=2, max_length=6)\n"
            "print('torch._dynamo' in sys.modules)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
