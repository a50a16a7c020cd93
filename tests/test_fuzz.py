"""Property tests (hypothesis) on hostile input: damaged image files, decompression-bomb headers, odd
texts, wrong-typed configs and overrides, damaged checkpoints. Each must end in a result or one clear
error (ImageError / CheckpointError / ValueError / TypeError from Python; from the CLI one stderr line and
exit 1 or 2), never a traceback or a hang. Examples are drawn deterministically (derandomize) and few
enough that the file runs in well under a minute on two cores; BLIP_FUZZ_SCALE=20 draws 20x as many, at
random, for a longer hunt."""
import contextlib
import dataclasses
import io
import json
import os
import struct
import subprocess
import sys
import tempfile
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from PIL import Image

import blip
from blip import transform
from blip.checkpoint import CheckpointError, read_state_dict, save_blip
from blip.cli import main
from blip.config import BlipConfig, get_config
from blip.tokenizer import CLS_ID, SEP_ID, get_tokenizer
from blip.train.config import TrainConfig
from blip.transform import ImageError, load_image, prepare_images

SCALE = int(os.environ.get("BLIP_FUZZ_SCALE", "1"))
FUZZ = settings(database=None, derandomize=SCALE == 1, deadline=10_000,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def fuzz(n: int):
    return settings(FUZZ, max_examples=n * SCALE)


pytestmark = pytest.mark.usefixtures("one_thread")


def run_cli(*argv) -> tuple[int, str, str]:
    """`blip ...` in this process: (exit code, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            rc = main([str(a) for a in argv])
        except SystemExit as e:  # argparse
            rc = e.code
    return rc, out.getvalue(), err.getvalue()


def assert_one_line_errors(err: str) -> None:
    assert "Traceback" not in err
    assert all(line.startswith("blip: ") for line in err.splitlines()), err


# ------------------------------------------------------------------------------ image bytes
def _encoded() -> dict[str, bytes]:
    a = np.random.default_rng(0).integers(0, 256, (40, 48, 3), dtype=np.uint8)
    frames = [Image.fromarray(a), Image.fromarray(a[::-1].copy())]
    out = {}
    for name, fmt, kw in [("jpeg", "JPEG", {"quality": 80}), ("png", "PNG", {}), ("webp", "WEBP", {}),
                          ("webp-lossless", "WEBP", {"lossless": True}),
                          ("gif", "GIF", {"save_all": True, "append_images": frames[1:]})]:
        buf = io.BytesIO()
        frames[0].save(buf, fmt, **kw)
        out[name] = buf.getvalue()
    return out


ENCODED = _encoded()


@st.composite
def damaged_images(draw) -> bytes:
    """A small JPEG/PNG/WebP/GIF truncated, bit-flipped, overwritten in part, or replaced by random bytes
    behind its own magic number (so that its decoder runs on them); or random bytes; or nothing."""
    data = bytearray(ENCODED[draw(st.sampled_from(sorted(ENCODED)))])
    kind = draw(st.sampled_from(["truncate", "flip", "overwrite", "magic+random", "random", "empty"]))
    if kind == "truncate":
        data = data[:draw(st.integers(0, len(data) - 1))]
    elif kind == "flip":
        flips = st.lists(st.tuples(st.integers(0, len(data) - 1), st.integers(0, 7)), min_size=1, max_size=12)
        for pos, bit in draw(flips):
            data[pos] ^= 1 << bit
    elif kind == "overwrite":
        start = draw(st.integers(0, len(data) - 1))
        patch = draw(st.binary(min_size=1, max_size=64))
        data[start:start + len(patch)] = patch
    elif kind == "magic+random":
        data = data[:12] + draw(st.binary(max_size=512))
    elif kind == "random":
        data = bytearray(draw(st.binary(max_size=512)))
    else:
        data = bytearray()
    return bytes(data)


@fuzz(400)
@given(damaged_images())
def test_damaged_image_bytes_give_an_image_or_an_image_error(data):
    try:
        img = load_image(data)
    except ImageError:
        img = None
    if img is not None:
        assert img.mode == "RGB" and min(img.size) > 0
    try:
        x = prepare_images([data], 32)
    except ImageError as e:
        assert img is None and "images[0]" in str(e) and "\n" not in str(e)
    else:
        assert img is not None and x.shape == (1, 3, 32, 32) and torch.isfinite(x).all()


@pytest.fixture(scope="module")
def captioner():
    torch.manual_seed(0)
    return blip.create_model("tiny", task="caption", device="cpu")


@fuzz(30)
@given(damaged_images())
def test_caption_of_damaged_bytes_is_captions_or_an_image_error(captioner, data):
    good = ENCODED["png"]
    try:
        out = captioner.caption([good, data], num_beams=1, max_length=6)
    except ImageError as e:
        assert "images[1]" in str(e)
    else:
        assert len(out) == 2 and all(isinstance(c, str) for c in out)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A tiny caption model and a tiny retrieval model saved in our format."""
    root = tmp_path_factory.mktemp("fuzz-models")
    torch.manual_seed(0)
    for task in ("caption", "retrieval"):
        save_blip(blip.create_model("tiny", task=task, device="cpu"), root / task)
    return root


def _readable(path) -> bool:
    try:
        load_image(path)
        return True
    except ImageError:
        return False


@fuzz(15)
@given(st.lists(damaged_images(), min_size=1, max_size=4), st.booleans())
def test_blip_caption_on_damaged_files(saved, blobs, with_a_good_one):
    with tempfile.TemporaryDirectory() as d:
        files = [Path(d) / f"img{i}.{ext}" for i, ext in zip(range(len(blobs)), ["jpg", "png", "webp", "gif"])]
        for f, data in zip(files, blobs):
            f.write_bytes(data)
        if with_a_good_one:
            files.append(Path(d) / "good.png")
            files[-1].write_bytes(ENCODED["png"])
        readable = [f for f in files if _readable(f)]
        rc, out, err = run_cli("caption", d, "--model", saved / "caption", "--num-beams", "1", "--max-length", "6",
                               "--batch-size", "2", "--quiet")
    assert_one_line_errors(err)
    assert rc == (2 if not readable else 1 if len(readable) < len(files) else 0)
    assert sorted(line.split("\t")[0] for line in out.splitlines()) == sorted(str(f) for f in readable)
    for f in set(files) - set(readable):
        assert sum(f.name in line for line in err.splitlines()) == 1  # each bad file named once


@pytest.mark.filterwarnings("ignore:Truncated File Read")  # from _readable, in this process
def test_blip_caption_process_on_a_folder_of_bad_files(saved, tmp_path):
    """A real process: exit 1, the readable images captioned, one line per bad file (a header claiming
    20000 x 20000 pixels among them), a Pillow warning (a truncated TIFF's) as one line, and a file name
    that is not UTF-8 printed where stdout is strict UTF-8."""
    for name, data in ENCODED.items():
        (tmp_path / f"trunc-{name}.png").write_bytes(data[: len(data) // 3])
    (tmp_path / "empty.jpg").write_bytes(b"")
    (tmp_path / "random.webp").write_bytes(np.random.default_rng(0).bytes(300))
    buf = io.BytesIO()
    Image.new("RGB", (40, 48)).save(buf, "TIFF")
    (tmp_path / "trunc.tif").write_bytes(buf.getvalue()[:95])  # Pillow warns "Truncated File Read", then fails
    (tmp_path / os.fsdecode(b"caf\xe9.png")).write_bytes(ENCODED["png"])
    (tmp_path / "bomb.png").write_bytes(_patched("png", 20000, 20000))  # refused before decoding
    files = [f for f in tmp_path.iterdir()]
    readable = [f for f in files if _readable(f)]
    env = dict(os.environ, PYTHONIOENCODING="utf-8:strict")
    r = subprocess.run([sys.executable, "-m", "blip.cli", "caption", str(tmp_path), "--model", str(saved / "caption"),
                        "--num-beams", "1", "--max-length", "6", "--quiet"], capture_output=True, env=env, timeout=300)
    err = r.stderr.decode()
    assert r.returncode == 1 and r.stdout.count(b"\n") == len(readable) and b"caf\xe9.png\t" in r.stdout
    assert_one_line_errors(err)
    assert "Truncated File Read" in err and "bomb.png' is too large" in err
    assert err.count("blip: error:") == len(files) - len(readable)


# ------------------------------------------------------------------------------ decompression bombs
def _png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def _patched(fmt: str, w: int, h: int) -> bytes:
    """A tiny image of format `fmt` whose header claims w x h."""
    if fmt == "png":
        return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
                + _png_chunk(b"IDAT", zlib.compress(b"\0" * 64)) + _png_chunk(b"IEND", b""))
    buf = io.BytesIO()
    Image.new("RGB", (16, 16), (90, 30, 200)).save(buf, fmt.upper(), **({"lossless": True} if fmt == "webp" else {}))
    d = bytearray(buf.getvalue())
    if fmt == "jpeg":
        i = d.find(b"\xff\xc0")
        d[i + 5:i + 9] = struct.pack(">HH", h, w)
    elif fmt == "gif":
        d[6:10] = struct.pack("<HH", w, h)
        i = d.find(b",")
        d[i + 5:i + 9] = struct.pack("<HH", w, h)
    elif fmt == "bmp":
        d[18:26] = struct.pack("<ii", w, h)
    else:  # VP8L: 14 bits width - 1, 14 bits height - 1, then alpha and version bits
        i = d.find(b"VP8L") + 9
        rest = int.from_bytes(d[i:i + 4], "little") & ~((1 << 28) - 1)
        d[i:i + 4] = struct.pack("<I", (w - 1) | ((h - 1) << 14) | rest)
    return bytes(d)


_LIMITS = {"png": 1 << 31, "jpeg": 65535, "gif": 65535, "bmp": 1 << 30, "webp": 16384}


@st.composite
def claimed_sizes(draw):
    fmt = draw(st.sampled_from(sorted(_LIMITS)))
    side = st.integers(1, _LIMITS[fmt]) | st.integers(1, 200)
    return fmt, draw(side), draw(side)


@fuzz(200)
@given(claimed_sizes())
def test_headers_claiming_huge_sizes_are_refused_before_decoding(size):
    """Our bound (transform.MAX_PIXELS, lowered here so that allowed sizes decode fast) replaces Pillow's
    guard, which is set very low here (it would raise DecompressionBombError) and must come back unchanged."""
    fmt, w, h = size
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(transform, "MAX_PIXELS", 100 * 100)
        mp.setattr(Image, "MAX_IMAGE_PIXELS", 500)
        try:
            img = load_image(_patched(fmt, w, h))
        except ImageError:
            pass
        else:
            assert w * h <= 100 * 100 and img.size[0] * img.size[1] <= 100 * 100
        assert Image.MAX_IMAGE_PIXELS == 500


# ------------------------------------------------------------------------------ texts
ODD_TEXTS = ["", " ", "\t\n\r ", "\x00\x01\x1b[31m\x7f", "\u200b\u200f\ufeff", "🐶🐱👩‍👩‍👧 🏳️‍🌈",
             "مرحبا بالعالم", "שלום עולם", "a\ud800b\udfff", "[SEP] [PAD] [CLS] [DEC] [ENC] [MASK]",
             "a" * 100_000, "dog " * 25_000]
texts = st.sampled_from(ODD_TEXTS) | st.text(st.characters(exclude_categories=()), max_size=300)


@fuzz(60)
@given(st.lists(texts, min_size=1, max_size=4))
def test_tokenizer_takes_any_text(batch):
    ids, mask = get_tokenizer()(batch, max_length=35)
    lengths = mask.sum(1)
    assert ids.shape[0] == len(batch) and ids.shape[1] <= 35 and (ids[:, 0] == CLS_ID).all()
    assert (ids[torch.arange(len(batch)), lengths - 1] == SEP_ID).all()
    for t in batch:
        assert isinstance(get_tokenizer().decode(get_tokenizer().encode(t)), str)


@pytest.fixture(scope="module")
def matcher(saved):
    return blip.load(saved / "retrieval", device="cpu")


@fuzz(30)
@given(st.lists(texts, min_size=1, max_size=3))
def test_match_and_embed_texts_take_any_text(matcher, batch):
    image = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    scores = matcher.match(image, batch)
    assert scores["itm"].shape == scores["itc"].shape == (len(batch),)
    assert ((scores["itm"] >= 0) & (scores["itm"] <= 1)).all() and (scores["itc"].abs() <= 1 + 1e-5).all()
    emb = matcher.embed_texts(batch)
    assert emb.shape[0] == len(batch) and torch.allclose(emb.norm(dim=-1), torch.ones(len(batch)), atol=1e-4)


@fuzz(30)
@given(texts, st.integers(1, 12))
def test_caption_prompt_takes_any_text(captioner, prompt, new_tokens):
    """A result, or a ValueError saying the prompt is too long for max_length or for the model."""
    image = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    prompt_tokens = len(get_tokenizer().encode(prompt)) - 1
    try:
        out = captioner.caption(image, prompt=prompt, max_length=min(prompt_tokens + new_tokens, 200), num_beams=2)
    except ValueError as e:
        assert "max_length" in str(e) or "positions" in str(e)
    else:
        assert len(out) == 1 and isinstance(out[0], str)


@fuzz(6)
@given(st.lists(texts.filter(lambda t: not t.startswith("-")), min_size=1, max_size=2))
def test_blip_match_cli_takes_any_text(saved, batch):
    path = saved / "match.png"
    path.write_bytes(ENCODED["png"])
    rc, out, err = run_cli("match", path, "--text", *batch, "--model", saved / "retrieval", "--json")
    assert rc == 0 and len(out.splitlines()) == len(batch) and not err


# ------------------------------------------------------------------------------ configs and overrides
json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-10**6, 10**6) | st.floats() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=6)


def _names_key(message: str, key: str, value) -> bool:
    """The error names the key (or, for an object of dotted keys, one of its keys)."""
    named = [key, repr(key)] + ([repr(k) for k in value] if isinstance(value, dict) else [])
    return any(name in message for name in named)


def _assert_default_types(obj) -> None:
    """Each field holds a value of its default's type (an int is never left where a float belongs)."""
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        if dataclasses.is_dataclass(value):
            _assert_default_types(value)
        elif default is not None and value is not None:
            assert type(value) is type(default), (f.name, value)


TINY = get_config("tiny").to_dict()
UNKNOWN_KEYS = st.builds(lambda s: f"zz{s}", st.text(st.characters(exclude_characters="."), max_size=4))
CONFIG_KEYS = sorted([k for k in TINY] + [f"{t}.{k}" for t in ("vision", "text") for k in TINY[t]])


@fuzz(250)
@given(st.sampled_from(CONFIG_KEYS) | UNKNOWN_KEYS | st.just("vision.zz"),
       json_values)
def test_model_config_json_with_a_bad_value_or_key(key, value):
    data = json.loads(json.dumps(TINY))
    node, _, leaf = key.rpartition(".")
    (data[node] if node else data)[leaf] = value
    try:
        cfg = BlipConfig.from_dict(data)
    except ValueError as e:
        assert _names_key(str(e), leaf, value), str(e)
    else:
        _assert_default_types(cfg)
        assert BlipConfig.from_json(cfg.to_json()) == cfg


@fuzz(80)
@given(st.sampled_from([k for k in CONFIG_KEYS if k not in ("vision", "text")]),
       st.sampled_from(["abc", "", "none", "true", "1e3", "-1", "0", "3", "2.5", "nan", "[1]", "{}", "caption"])
       | st.text(max_size=6))
def test_model_config_overrides_from_strings(key, text):
    try:
        cfg = get_config("tiny", **{key: text})
    except ValueError as e:
        assert key.rpartition(".")[2] in str(e), str(e)
    else:
        _assert_default_types(cfg)


TRAIN_KEYS = sorted(f.name for f in dataclasses.fields(TrainConfig))


@fuzz(250)
@given(st.sampled_from(TRAIN_KEYS) | UNKNOWN_KEYS, json_values)
def test_training_config_with_a_bad_value_or_key(key, value):
    try:
        cfg = TrainConfig.from_dict({"model": "tiny", key: value})
    except ValueError as e:
        assert _names_key(str(e), key, value), str(e)
    else:
        _assert_default_types(cfg)
        assert TrainConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg


@fuzz(60)
@given(st.sampled_from(TRAIN_KEYS + ["model.vision.width", "model.text.depth", "model.task"]),
       st.sampled_from(["abc", "", "null", "true", "-1", "0", "3", "2.5", "[1]", '["a"]', '{"a": 1}', "{"])
       | st.text(max_size=6))
def test_training_config_key_value_overrides(key, text):
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "c.json"
        path.write_text(json.dumps({"_comment": "x", "model": "tiny"}))
        try:
            TrainConfig.load(path, [f"{key}={text}"])
        except ValueError as e:
            with contextlib.suppress(ValueError):
                text = json.loads(text)
            assert _names_key(str(e), key.removeprefix("model."), text), str(e)


_WRONG = [True, 7, 2.5, "abc", [1], {"a": 1}, None]


@fuzz(15)
@given(st.sampled_from(TRAIN_KEYS), st.sampled_from(_WRONG), st.booleans())
def test_blip_pretrain_with_a_wrong_typed_value_is_one_line(key, value, as_override):
    try:
        TrainConfig.from_dict({key: value})
        assume(False)  # a valid config would start training
    except ValueError:
        pass
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "bad.json"
        path.write_text(json.dumps({} if as_override else {key: value}))
        rc, out, err = run_cli("pretrain", "--config", path, *([f"{key}={json.dumps(value)}"] if as_override else []),
                               "--out", Path(d) / "run")
    assert rc == 2 and not out and err.count("\n") == 1 and err.startswith("blip: error:"), err
    assert _names_key(err, key, value), err


def test_blip_pretrain_with_a_broken_config_file_is_one_line(tmp_path):
    for name, text in [("list", "[1, 2]"), ("broken", '{"batch_size": '), ("binary", "\udcff\udcfe")]:
        path = tmp_path / f"{name}.json"
        path.write_bytes(text.encode("utf-8", "surrogateescape"))
        rc, out, err = run_cli("pretrain", "--config", path, "--out", tmp_path / "run")
        assert rc == 2 and err.count("\n") == 1 and err.startswith("blip: error:"), err
    (tmp_path / "ok.json").write_text('{"model": "tiny"}')
    rc, _, err = run_cli("pretrain", "--config", tmp_path / "ok.json", "batch_size")
    assert rc == 2 and "key=value" in err


# ------------------------------------------------------------------------------ checkpoints
@pytest.fixture(scope="module")
def weights(saved):
    return read_state_dict(saved / "caption" / "model.safetensors")


def _write(saved, sd: dict, folder: Path, fmt: str) -> Path:
    if fmt == "pth":
        torch.save({"model": sd}, folder / "model.pth")
        return folder / "model.pth"
    from safetensors.torch import save_file
    (folder / "config.json").write_text((saved / "caption" / "config.json").read_text())
    save_file(sd, str(folder / "model.safetensors"))
    return folder


CORRUPTIONS = {"nan": float("nan"), "inf": float("inf"), "-inf": float("-inf"), "int64": torch.int64,
               "int32": torch.int32, "uint8": torch.uint8, "bool": torch.bool,
               "fp16": torch.float16, "bf16": torch.bfloat16, "fp64": torch.float64}


@fuzz(40)
@given(st.data(), st.sampled_from(sorted(CORRUPTIONS)), st.sampled_from(["safetensors", "pth"]))
def test_checkpoint_with_a_bad_tensor_names_it(saved, weights, data, corruption, fmt):
    key = data.draw(st.sampled_from(sorted(weights)))
    sd = {k: v.clone() for k, v in weights.items()}
    change = CORRUPTIONS[corruption]
    if isinstance(change, float):
        sd[key].view(-1)[data.draw(st.integers(0, sd[key].numel() - 1))] = change
    else:
        sd[key] = sd[key].to(change)
    with tempfile.TemporaryDirectory() as d:
        path = _write(saved, sd, Path(d), fmt)
        if isinstance(change, float) or not change.is_floating_point:
            says = "NaN or Inf" if isinstance(change, float) else "wrong dtype"
            with pytest.raises(CheckpointError, match=says) as e:
                blip.load(path, device="cpu")
            assert key in str(e.value)
        else:  # other float types load, in the model's dtype
            model = blip.load(path, device="cpu")
            assert {p.dtype for p in model.parameters()} == {torch.float32}
            assert torch.equal(model.state_dict()[key], sd[key].float())


@fuzz(40)
@given(st.sampled_from(["safetensors", "pth"]), st.floats(0, 1, exclude_max=True),
       st.lists(st.tuples(st.floats(0, 1, exclude_max=True), st.integers(0, 7)), max_size=6))
def test_damaged_checkpoint_file_is_a_checkpoint_error(saved, weights, fmt, cut, flips):
    """Truncated (cut < 1) or bit-flipped files: a CheckpointError of one line, or a model whose weights are
    all finite (a flipped bit in the data of a tensor can leave a valid checkpoint)."""
    with tempfile.TemporaryDirectory() as d:
        path = _write(saved, weights, Path(d), fmt)
        file = path / "model.safetensors" if fmt == "safetensors" else path
        data = bytearray(file.read_bytes())
        for where, bit in flips:
            data[int(where * len(data))] ^= 1 << bit
        if not flips or cut > 0.5:
            data = data[:int(cut * len(data))]
        file.write_bytes(bytes(data))
        try:
            model = blip.load(path, device="cpu")
        except CheckpointError as e:
            assert "\n" not in str(e)
        else:
            assert all(torch.isfinite(t).all() for t in model.state_dict().values())


def test_truncated_training_checkpoint_and_wrong_kind_are_one_line(saved, tmp_path):
    (tmp_path / "checkpoint.pt").write_bytes((saved / "caption" / "model.safetensors").read_bytes()[:5000])
    torch.save({"model": {"x": torch.zeros(2)}}, tmp_path / "model.pt")
    for name, says in [("checkpoint.pt", "is damaged"), ("model.pt", "not a training checkpoint")]:
        rc, out, err = run_cli("pretrain", "--resume", tmp_path / name)
        assert rc == 2 and err.count("\n") == 1 and says in err and name in err, err
