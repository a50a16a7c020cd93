"""Tests for blip.transform: robust loading, eval/train transforms, RandomAugment ops."""

import io
import random
import struct
import warnings
import zlib

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

from blip import transform as T
from blip.transform import (
    OPENAI_CLIP_MEAN,
    OPENAI_CLIP_STD,
    EvalTransform,
    ImageError,
    RandomAugment,
    TrainTransform,
    image_batches,
    iter_images,
    load_image,
    normalize,
    prepare_images,
    random_resized_crop_params,
    to_tensor,
)

MEAN = np.array(OPENAI_CLIP_MEAN).reshape(3, 1, 1)
STD = np.array(OPENAI_CLIP_STD).reshape(3, 1, 1)


def noise(h, w, seed=0, lo=0, hi=256):
    return np.random.default_rng(seed).integers(lo, hi, size=(h, w, 3), dtype=np.uint8)


def smooth(h, w):
    yy, xx = np.mgrid[0:h, 0:w]
    return np.stack([xx * 3, yy * 4, (xx + yy) * 2], -1).clip(0, 255).astype(np.uint8)


def png_chunk(kind, data):
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


# -----------------------------------------------------------------------------
# loading: modes


def _ramp16(w=30, h=20):
    return (np.linspace(0, 65535, w * h).reshape(h, w)).astype(np.uint16)


def _make(mode):
    rgb = Image.fromarray(noise(20, 30))
    if mode == "I;16":
        return Image.fromarray(_ramp16())
    if mode in ("I;16B", "I;16L"):
        dt = ">u2" if mode == "I;16B" else "<u2"
        return Image.frombytes(mode, (30, 20), _ramp16().astype(dt).tobytes())
    if mode == "P+transparency":
        p = rgb.convert("P")
        p.info["transparency"] = 3
        return p
    return rgb.convert(mode)


@pytest.mark.parametrize("mode", ["L", "LA", "La", "RGBA", "RGBX", "P", "P+transparency", "PA", "CMYK",
                                  "YCbCr", "1", "I", "F", "I;16", "I;16B", "I;16L", "HSV"])
def test_every_mode_loads_to_rgb_of_right_size(mode):
    out = load_image(_make(mode))
    assert out.mode == "RGB"
    assert out.size == (30, 20)


@pytest.mark.parametrize("mode,fmt", [("L", "PNG"), ("LA", "PNG"), ("RGBA", "PNG"), ("P", "PNG"), ("1", "PNG"),
                                      ("I;16", "PNG"), ("I;16", "TIFF"), ("CMYK", "JPEG"), ("CMYK", "TIFF"),
                                      ("F", "TIFF"), ("L", "JPEG"), ("RGB", "WEBP"), ("P", "GIF"), ("RGB", "BMP")])
def test_every_mode_loads_from_file(tmp_path, mode, fmt):
    path = tmp_path / f"img.{fmt.lower()}"
    _make(mode).save(path, fmt)
    out = load_image(path)
    assert out.mode == "RGB" and out.size == (30, 20)
    assert load_image(str(path)).size == (30, 20)


def test_alpha_is_dropped_not_composited():
    a = np.zeros((4, 5, 4), np.uint8)
    a[..., :3] = (10, 20, 30)  # fully transparent, colour kept as stored (official .convert('RGB'))
    out = np.asarray(load_image(Image.fromarray(a, "RGBA")))
    assert (out == (10, 20, 30)).all()


def test_palette_transparency_keeps_palette_colour(tmp_path):
    p = Image.new("P", (6, 4), 1)
    p.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
    p.info["transparency"] = bytes([255, 0, 128] + [255] * 253)  # per-index alpha, given as bytes
    p.save(tmp_path / "p.png")
    assert isinstance(Image.open(tmp_path / "p.png").info["transparency"], bytes)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no Pillow palette-transparency warning either
        out = np.asarray(load_image(tmp_path / "p.png"))
    assert (out == (0, 0, 255)).all()


def test_sixteen_bit_ramp_is_scaled_not_clipped(tmp_path):
    ramp = np.tile(np.linspace(0, 65535, 256).astype(np.uint16), (8, 1))
    Image.fromarray(ramp).save(tmp_path / "r.png")
    assert Image.open(tmp_path / "r.png").mode == "I;16"
    out = np.asarray(load_image(tmp_path / "r.png"))
    assert out.shape == (8, 256, 3)
    assert out.min() == 0 and out.max() == 255
    assert (out[..., 0] == out[..., 2]).all()
    np.testing.assert_array_equal(out[0, :, 0], np.rint(ramp[0] / 257.0).astype(np.uint8))
    assert (np.diff(out[0, :, 0].astype(int)) >= 0).all()
    assert (out == 255).mean() < 0.01  # Pillow's own convert would make ~99% of it 255


def test_int32_and_float_images_are_scaled():
    wide = np.linspace(-1000, 100000, 600).reshape(20, 30).astype(np.int32)  # outside 16-bit: stretched
    out = np.asarray(load_image(Image.fromarray(wide, "I")))[..., 0]
    assert out.min() == 0 and out.max() == 255
    unit = np.linspace(0, 1, 600).reshape(20, 30).astype(np.float32)  # [0,1] floats: times 255
    out = np.asarray(load_image(Image.fromarray(unit, "F")))[..., 0]
    np.testing.assert_array_equal(out, np.rint(unit.astype(np.float64) * 255).astype(np.uint8))
    nan = unit.copy()
    nan[0, 0] = np.nan
    assert np.asarray(load_image(Image.fromarray(nan, "F")))[0, 0, 0] == 0


def test_exif_orientation_6_rotates(tmp_path):
    a = np.zeros((20, 40, 3), np.uint8)
    a[:, :20] = (255, 0, 0)  # stored: left half red, right half blue
    a[:, 20:] = (0, 0, 255)
    img = Image.fromarray(a)
    exif = img.getexif()
    exif[0x0112] = 6  # "rotate 90 CW to display": stored left column becomes the top row
    img.save(tmp_path / "o.jpg", exif=exif, quality=95)
    out = np.asarray(load_image(tmp_path / "o.jpg")).astype(int)
    assert out.shape == (40, 20, 3)
    assert out[:15, :, 0].mean() > 200 and out[:15, :, 2].mean() < 50  # red on top
    assert out[25:, :, 2].mean() > 200 and out[25:, :, 0].mean() < 50  # blue at the bottom


def test_animated_gif_gives_first_frame(tmp_path):
    frames = [Image.new("RGB", (8, 6), c) for c in [(255, 0, 0), (0, 255, 0), (0, 0, 255)]]
    frames[0].save(tmp_path / "a.gif", save_all=True, append_images=frames[1:], duration=50)
    assert Image.open(tmp_path / "a.gif").n_frames == 3
    out = np.asarray(load_image(tmp_path / "a.gif"))
    assert out.shape == (6, 8, 3) and (out == (255, 0, 0)).all()


def test_bytes_and_file_objects(tmp_path):
    Image.fromarray(noise(9, 7)).save(tmp_path / "x.png")
    data = (tmp_path / "x.png").read_bytes()
    ref = np.asarray(load_image(tmp_path / "x.png"))
    np.testing.assert_array_equal(np.asarray(load_image(data)), ref)
    np.testing.assert_array_equal(np.asarray(load_image(bytearray(data))), ref)
    with open(tmp_path / "x.png", "rb") as f:
        np.testing.assert_array_equal(np.asarray(load_image(f)), ref)
        assert not f.closed  # the caller's file stays the caller's


def test_jpeg_draft_decodes_smaller(tmp_path):
    Image.fromarray(smooth(1200, 1600)).save(tmp_path / "d.jpg")
    assert load_image(tmp_path / "d.jpg", draft_size=200).size == (400, 300)  # 1/4 keeps both sides >= 200
    assert load_image(tmp_path / "d.jpg").size == (1600, 1200)


# -----------------------------------------------------------------------------
# loading: errors


def _assert_image_error(src, *needles):
    with pytest.raises(ImageError) as ei:
        load_image(src)
    msg = str(ei.value)
    assert "\n" not in msg
    for n in needles:
        assert n in msg, msg
    return msg


def test_missing_file(tmp_path):
    p = tmp_path / "nope.jpg"
    assert "not found" in _assert_image_error(p, str(p))


def test_text_file_named_jpg(tmp_path):
    p = tmp_path / "fake.jpg"
    p.write_text("this is not an image\n")
    _assert_image_error(p, str(p))
    assert issubclass(ImageError, ValueError)


def test_truncated_and_corrupt_files(tmp_path):
    Image.fromarray(noise(64, 64)).save(tmp_path / "ok.jpg", quality=90)
    data = (tmp_path / "ok.jpg").read_bytes()
    (tmp_path / "trunc.jpg").write_bytes(data[: len(data) // 2])
    _assert_image_error(tmp_path / "trunc.jpg", str(tmp_path / "trunc.jpg"))
    Image.fromarray(noise(64, 64)).save(tmp_path / "ok.png")
    png = bytearray((tmp_path / "ok.png").read_bytes())
    png[60:200] = bytes(140)  # clobber the image data
    (tmp_path / "bad.png").write_bytes(bytes(png))
    _assert_image_error(tmp_path / "bad.png", str(tmp_path / "bad.png"))


def test_empty_and_zero_size_images(tmp_path):
    (tmp_path / "empty.png").write_bytes(b"")
    _assert_image_error(tmp_path / "empty.png", str(tmp_path / "empty.png"))
    _assert_image_error(Image.new("RGB", (0, 5)), "zero size")
    _assert_image_error(tmp_path, str(tmp_path))  # a directory
    _assert_image_error(12345, "int")


def test_oversized_image_is_refused_before_decoding(tmp_path, monkeypatch):
    # a valid PNG header announcing 20000 x 20000 = 400M pixels > MAX_PIXELS
    ihdr = struct.pack(">IIBBBBB", 20000, 20000, 8, 2, 0, 0, 0)
    data = b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", zlib.compress(b"")) + png_chunk(b"IEND", b"")
    (tmp_path / "huge.png").write_bytes(data)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 12_345_678)
    _assert_image_error(tmp_path / "huge.png", "too large", str(tmp_path / "huge.png"))
    assert Image.MAX_IMAGE_PIXELS == 12_345_678  # Pillow's global guard is restored


def test_10000x10000_image_loads_and_transforms(tmp_path, monkeypatch):
    a = np.full((10000, 10000), 77, np.uint8)
    a[:5000] = 200  # top half brighter
    Image.fromarray(a).save(tmp_path / "big.png", compress_level=1)
    del a
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 89_478_485)  # Pillow's default: warns at 89M, refuses 179M
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        img = load_image(tmp_path / "big.png")
        assert img.size == (10000, 10000) and img.mode == "RGB"
        x = EvalTransform(384)(img)
        y = TrainTransform(384, randaugment=False)(img, generator=np.random.default_rng(0))
    assert Image.MAX_IMAGE_PIXELS == 89_478_485
    assert x.shape == (3, 384, 384) and y.shape == (3, 384, 384)
    top = (200 / 255 - OPENAI_CLIP_MEAN[0]) / OPENAI_CLIP_STD[0]
    bottom = (77 / 255 - OPENAI_CLIP_MEAN[0]) / OPENAI_CLIP_STD[0]
    assert abs(x[0, 10, 10].item() - top) < 1e-5 and abs(x[0, 370, 10].item() - bottom) < 1e-5


# -----------------------------------------------------------------------------
# tensors and the eval transform


def test_to_tensor_and_normalize():
    a = noise(5, 7)
    x = to_tensor(Image.fromarray(a))
    assert x.dtype == torch.float32 and x.shape == (3, 5, 7)
    np.testing.assert_array_equal(x.numpy(), a.transpose(2, 0, 1).astype(np.float32) / np.float32(255))
    n = normalize(x)
    np.testing.assert_allclose(n.numpy(), (a.transpose(2, 0, 1) / 255 - MEAN) / STD, atol=1e-6)
    torch.testing.assert_close(normalize(x.unsqueeze(0).repeat(2, 1, 1, 1))[1], n)
    with pytest.raises(ValueError):
        normalize(torch.zeros(4, 5, 5))


@pytest.mark.parametrize("size", [384, 64])
def test_eval_transform_matches_pillow_bicubic_plus_normalise(size):
    img = Image.fromarray(noise(23, 37, seed=3))
    out = EvalTransform(size)(img)
    assert out.dtype == torch.float32 and out.shape == (3, size, size)
    ref = np.asarray(img.resize((size, size), Image.Resampling.BICUBIC), dtype=np.float64).transpose(2, 0, 1)
    ref = (ref / 255.0 - MEAN) / STD
    assert np.abs(out.numpy() - ref).max() < 1e-6


def test_eval_transform_keeps_no_aspect_and_accepts_paths(tmp_path):
    a = np.zeros((10, 40, 3), np.uint8)
    a[:, 20:] = 255  # right half white -> right half of the square output
    Image.fromarray(a).save(tmp_path / "w.png")
    out = EvalTransform(32)(tmp_path / "w.png")
    assert out[:, :, :12].max() < -1.0 and out[:, :, 20:].min() > 1.0


def test_one_pixel_image():
    img = Image.new("RGB", (1, 1), (9, 99, 199))
    out = EvalTransform(384)(img)
    assert out.shape == (3, 384, 384)
    expect = (np.array([9, 99, 199]) / 255 - MEAN[:, 0, 0]) / STD[:, 0, 0]
    np.testing.assert_allclose(out[:, 200, 100].numpy(), expect, atol=1e-5)
    assert TrainTransform(384)(img, generator=0).shape == (3, 384, 384)


# -----------------------------------------------------------------------------
# random resized crop and the train transform


@pytest.mark.parametrize("wh", [(640, 480), (480, 640), (100, 100), (1, 1), (3, 2), (2000, 40), (40, 2000)])
@pytest.mark.parametrize("scale", [(0.2, 1.0), (0.5, 1.0)])
def test_random_resized_crop_params_stay_in_bounds(wh, scale):
    width, height = wh
    rng = np.random.default_rng(0)
    areas = []
    for _ in range(300):
        left, top, w, h = random_resized_crop_params(width, height, scale, (3 / 4, 4 / 3), rng)
        assert 0 < w <= width and 0 < h <= height
        assert 0 <= left and left + w <= width and 0 <= top and top + h <= height
        areas.append(w * h / (width * height))
        if min(width, height) >= 100:  # big enough that rounding is negligible
            assert scale[0] - 0.02 <= areas[-1] <= 1.0
            assert 3 / 4 - 0.02 <= w / h <= 4 / 3 + 0.02
    if min(width, height) >= 100:
        assert max(areas) - min(areas) > (1 - scale[0]) * 0.5  # it really is random


def test_random_resized_crop_fallback_is_central_and_ratio_clamped():
    # 1000x10 cannot hold any 3/4..4/3 box of >= 90% area: torchvision falls back to a central crop
    assert random_resized_crop_params(1000, 10, (0.9, 1.0), (3 / 4, 4 / 3), np.random.default_rng(0)) == (493, 0, 13, 10)
    assert random_resized_crop_params(10, 1000, (0.9, 1.0), (3 / 4, 4 / 3), np.random.default_rng(0)) == (0, 493, 10, 13)


def test_random_resized_crop_makes_ten_attempts_before_falling_back():
    # on 200x100 with scale (0.5,1) an attempt fits with p ~= 0.079 (it needs area/10000 <= aspect),
    # so the central 133x100 fallback should come 0.921**10 ~= 44% of the time (92% with one try)
    rng = np.random.default_rng(0)
    draws = [random_resized_crop_params(200, 100, (0.5, 1.0), (3 / 4, 4 / 3), rng) for _ in range(500)]
    assert 150 < sum(d == (33, 0, 133, 100) for d in draws) < 275


def test_train_transform_shape_and_determinism():
    img = Image.fromarray(noise(120, 90, seed=5))
    t = TrainTransform(64, min_scale=0.2)
    a = t(img, generator=np.random.default_rng(7))
    b = t(img, generator=np.random.default_rng(7))
    c = t(img, generator=np.random.default_rng(8))
    assert a.shape == (3, 64, 64) and a.dtype == torch.float32
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert torch.equal(t(img, generator=random.Random(1)), t(img, generator=random.Random(1)))
    assert torch.equal(t(img, generator=3), t(img, generator=3))
    outs = [t(img) for _ in range(3)]  # fresh generator each call
    assert not (torch.equal(outs[0], outs[1]) and torch.equal(outs[1], outs[2]))


def test_train_transform_is_crop_resize_flip_in_that_order():
    img = Image.fromarray(noise(80, 100, seed=6))
    for seed in range(6):
        out = TrainTransform(48, randaugment=False)(img, generator=np.random.default_rng(seed))
        rng = np.random.default_rng(seed)
        left, top, w, h = random_resized_crop_params(100, 80, (0.5, 1.0), (3 / 4, 4 / 3), rng)
        ref = img.crop((left, top, left + w, top + h)).resize((48, 48), Image.Resampling.BICUBIC)
        if rng.random() < 0.5:
            ref = ref.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        assert torch.equal(out, normalize(to_tensor(ref)))


def test_train_transform_cache_gives_the_uncached_pixels_and_stays_bounded(tmp_path):
    paths = []
    for i in range(4):
        paths.append(tmp_path / f"{i}.png")
        Image.fromarray(noise(96, 90 + 10 * i, seed=i)).save(paths[-1])
    cached = TrainTransform(32, min_scale=1.0, randaugment=True, hflip=True)
    plain = TrainTransform(32, min_scale=1.0, randaugment=True, hflip=True, cache_bytes=0)
    for epoch in range(3):  # the second and third epochs come from the cache
        for i, p in enumerate(paths):
            g = [epoch, i]
            assert torch.equal(cached(p, generator=np.random.default_rng(g)), plain(p, generator=np.random.default_rng(g)))
    assert cached._cached_bytes == 4 * 32 * 32 * 3 and not plain._cache
    small = TrainTransform(32, min_scale=1.0, cache_bytes=2 * 32 * 32 * 3)
    for p in paths:
        small(p, generator=0)
    assert small._cached_bytes == 2 * 32 * 32 * 3  # full: the rest is decoded every time
    assert TrainTransform(32, min_scale=0.5).cache_bytes == 0  # random crops never repeat: no cache
    paths[0].write_bytes(b"not an image")  # a cached file's pixels stay what was read; uncached files fail
    with pytest.raises(ImageError):
        plain(paths[0], generator=0)


# -----------------------------------------------------------------------------
# RandomAugment ops (semantics of the official cv2 implementation)

FILL = (128, 128, 128)


def test_identity_and_magnitude_five_neutral_ops():
    a = noise(16, 20)
    assert np.array_equal(T.identity(a), a)
    # at M=5 the enhance factor is (5/10)*1.8+0.1 == 1.0 exactly: Brightness/Sharpness do nothing
    ra = RandomAugment(2, 5, ["Brightness", "Sharpness", "Identity"])
    for seed in range(10):
        assert np.array_equal(np.asarray(ra(Image.fromarray(a), np.random.default_rng(seed))), a)


def test_translate_moves_content_and_fills_128():
    a = noise(12, 16)
    out = T.translate_x(a, 5.0, FILL)  # content moves left by 5
    assert np.array_equal(out[:, :11], a[:, 5:]) and (out[:, 11:] == 128).all()
    out = T.translate_x(a, -5.0, FILL)  # ... or right
    assert np.array_equal(out[:, 5:], a[:, :11]) and (out[:, :5] == 128).all()
    out = T.translate_y(a, 5.0, FILL)
    assert np.array_equal(out[:7], a[5:]) and (out[7:] == 128).all()


def test_shear_maps_rows_and_columns():
    a = noise(10, 14)
    out = T.shear_x(a, 1.0, FILL)  # dst(x + y, y) = src(x, y)
    for y in range(10):
        assert np.array_equal(out[y, y:], a[y, : 14 - y]) and (out[y, :y] == 128).all()
    out = T.shear_y(a, 1.0, FILL)  # dst(x, y + x) = src(x, y)
    for x in range(10):
        assert np.array_equal(out[x:, x], a[: 10 - x, x]) and (out[:x, x] == 128).all()


def test_rotate_matches_pillow_rotate_with_fill():
    a = smooth(64, 80)
    for deg in (15.0, -15.0, 30.0):
        out = T.rotate(a, deg, FILL).astype(int)
        # cv2 rotates about (W/2, H/2) with pixel centres on integers = Pillow's (W/2+.5, H/2+.5)
        ref = Image.fromarray(a).rotate(deg, resample=Image.Resampling.BILINEAR, center=(40.5, 32.5), fillcolor=FILL)
        ref = np.asarray(ref).astype(int)
        inner = (slice(20, 44), slice(25, 55))
        assert np.abs(out[inner] - ref[inner]).max() <= 1
        assert (out[0, 0] == 128).all() and (out[-1, -1] == 128).all()  # corners rotate out of view
    # direction: positive angle is counter-clockwise, so a dot right of centre goes up
    dot = np.zeros((41, 41, 3), np.uint8)
    dot[20, 30] = 255
    out = T.rotate(dot, 90.0, (0, 0, 0))
    y, x = np.unravel_index(out[..., 0].argmax(), out.shape[:2])
    assert y < 20 and abs(x - 20) <= 1


# Channel 0 of the official cv2 ops (transform/randaugment.py, opencv-python 4.8.1) on
# a[y, x, c] = (37x + 91y + 53c) % 256, 6x8, fill 128: pins the fixed-point rounding and centre.
CV2_GOLDEN = {
    "rotate_15": [
        [122, 110, 114, 139, 167, 151, 76, 114], [27, 86, 147, 206, 121, 67, 127, 153],
        [106, 141, 89, 84, 86, 145, 179, 63], [184, 168, 45, 106, 165, 160, 149, 93],
        [40, 65, 124, 185, 58, 47, 105, 165], [110, 144, 144, 88, 74, 111, 136, 142]],
    "rotate_-30": [
        [128, 169, 157, 143, 129, 125, 139, 128], [83, 68, 131, 41, 156, 214, 148, 190],
        [121, 107, 94, 80, 67, 114, 39, 113], [219, 154, 192, 162, 165, 152, 138, 124],
        [141, 71, 67, 80, 39, 154, 187, 124], [128, 128, 110, 103, 102, 89, 95, 92]],
    "shear_x_0.15": [
        [0, 37, 74, 111, 148, 185, 222, 3], [97, 122, 159, 196, 233, 54, 51, 88],
        [165, 207, 68, 25, 62, 99, 136, 173], [66, 38, 75, 112, 149, 186, 223, 116],
        [120, 123, 160, 197, 130, 15, 52, 89], [146, 208, 181, 26, 63, 100, 137, 174]],
    "shear_y_-0.15": [
        [0, 51, 102, 151, 202, 61, 72, 100], [91, 142, 113, 130, 141, 88, 139, 175],
        [182, 193, 28, 77, 128, 179, 230, 26], [17, 68, 119, 168, 67, 78, 89, 117],
        [108, 159, 130, 147, 54, 105, 156, 197], [199, 219, 52, 86, 113, 128, 131, 128]],
    "translate_x_2.5": [
        [93, 130, 167, 204, 113, 66, 128, 128], [184, 221, 130, 39, 76, 111, 128, 128],
        [19, 56, 93, 130, 167, 157, 128, 128], [110, 147, 184, 221, 130, 74, 128, 128],
        [201, 110, 19, 56, 93, 120, 128, 128], [36, 73, 110, 147, 184, 165, 128, 128]],
    "translate_y_-1.25": [
        [128, 128, 128, 128, 128, 128, 128, 128], [32, 60, 88, 115, 143, 171, 199, 34],
        [68, 105, 142, 179, 216, 61, 98, 71], [159, 196, 41, 78, 115, 88, 125, 162],
        [58, 95, 68, 105, 142, 179, 216, 61], [85, 122, 159, 196, 41, 78, 115, 88]],
}


@pytest.mark.parametrize("key", sorted(CV2_GOLDEN))
def test_geometric_ops_bit_exact_with_official_cv2(key):
    yy, xx = np.mgrid[0:6, 0:8]
    a = np.stack([(xx * 37 + yy * 91 + c * 53) % 256 for c in range(3)], -1).astype(np.uint8)
    name, arg = key.rsplit("_", 1)
    out = getattr(T, name)(a, float(arg), FILL)
    np.testing.assert_array_equal(out[..., 0], np.array(CV2_GOLDEN[key], np.uint8))


def test_autocontrast_equalize_match_pillow():
    a = noise(30, 40, seed=2, lo=30, hi=220)
    pil = Image.fromarray(a)
    assert np.array_equal(T.equalize(a), np.asarray(ImageOps.equalize(pil)))
    assert np.array_equal(T.autocontrast(a, faithful=False), np.asarray(ImageOps.autocontrast(pil)))
    # faithful (default): the official `-low` wraps on uint8, so channels with min > 0 saturate
    b = a.copy()
    b[0, 0, 0] = 0
    out = T.autocontrast(b)
    assert (out[..., 1:] == 255).all()
    ch = b[..., 0].astype(int)
    np.testing.assert_array_equal(out[..., 0], np.floor(ch * (255.0 / ch.max())).astype(np.uint8))


def test_brightness_sharpness_solarize_posterize():
    a = noise(9, 11, seed=4)
    np.testing.assert_array_equal(T.brightness(a, 1.9), np.minimum(np.floor(a * np.float32(1.9)), 255).astype(np.uint8))
    assert np.array_equal(T.sharpness(a, 1.0), a)
    blur = T.sharpness(a, 0.0)
    k = np.ones((3, 3)) / 13
    k[1, 1] = 5 / 13
    assert blur[4, 5, 1] == int(np.rint((a[3:6, 4:7, 1] * k).sum()))
    half = T.sharpness(a, 0.5)
    assert np.array_equal(half[0], a[0])  # the one-pixel border keeps the input
    np.testing.assert_array_equal(T.solarize(a, 128), np.where(a < 128, a, 255 - a))
    np.testing.assert_array_equal(T.posterize(a, 2), a & 0b11000000)


def test_random_augment_picks_ops_with_half_probability_and_signs():
    a = smooth(24, 32)
    shifted = {5.0: T.translate_x(a, 5.0, FILL), -5.0: T.translate_x(a, -5.0, FILL)}
    counts = {"none": 0, 5.0: 0, -5.0: 0}
    ra = RandomAugment(1, 5, ["TranslateX"])  # magnitude 5 -> 5 pixels
    for seed in range(400):
        out = np.asarray(ra(Image.fromarray(a), np.random.default_rng(seed)))
        match = [k for k, v in shifted.items() if np.array_equal(out, v)]
        if np.array_equal(out, a):
            counts["none"] += 1
        else:
            assert len(match) == 1
            counts[match[0]] += 1
    assert 160 < counts["none"] < 240 and 60 < counts[5.0] < 140 and 60 < counts[-5.0] < 140
    rot = RandomAugment(1, 5, ["Rotate"])  # magnitude 5 -> +-15 degrees
    allowed = [a, T.rotate(a, 15.0, FILL), T.rotate(a, -15.0, FILL)]
    seen = set()
    for seed in range(40):
        out = np.asarray(rot(a, np.random.default_rng(seed)))
        seen.add(next(i for i, v in enumerate(allowed) if np.array_equal(out, v)))
    assert seen == {0, 1, 2}
    shear = RandomAugment(1, 5, ["ShearY"])  # magnitude 5 -> +-0.15
    allowed = [a, T.shear_y(a, 0.15, FILL), T.shear_y(a, -0.15, FILL)]
    for seed in range(20):
        out = np.asarray(shear(a, np.random.default_rng(seed)))
        assert any(np.array_equal(out, v) for v in allowed)


def test_random_augment_api():
    ra = RandomAugment()
    assert ra.augs == T.BLIP_AUGS and ra.n == 2 and ra.m == 5
    assert set(T.BLIP_AUGS) <= set(T.AUG_OPS)
    img = Image.fromarray(noise(20, 24))
    out = ra(img, np.random.default_rng(0))
    assert isinstance(out, Image.Image) and out.mode == "RGB" and out.size == (24, 20)
    assert np.array_equal(np.asarray(ra(img, np.random.default_rng(1))), np.asarray(ra(img, np.random.default_rng(1))))
    with pytest.raises(ValueError):
        RandomAugment(2, 5, ["Cutout"])


# -----------------------------------------------------------------------------
# prepare_images


def test_prepare_images_passes_tensors_through():
    x = torch.randn(3, 50, 60)
    out = prepare_images(x, 384)
    assert out.shape == (1, 3, 50, 60) and torch.equal(out[0], x)
    y = torch.randn(2, 3, 40, 40, dtype=torch.float64)
    out = prepare_images(y, 384, dtype=torch.float32)
    assert out.dtype == torch.float32 and out.shape == (2, 3, 40, 40)
    torch.testing.assert_close(out, y.float())
    with pytest.raises(ImageError):
        prepare_images(torch.zeros(3, 8, 8, dtype=torch.uint8), 384)
    with pytest.raises(ImageError):
        prepare_images(torch.zeros(2, 4, 8, 8), 384)


def test_prepare_images_from_sources(tmp_path):
    a, b = Image.fromarray(noise(20, 30, seed=1)), Image.fromarray(noise(33, 17, seed=2))
    b.save(tmp_path / "b.png")
    out = prepare_images([a, tmp_path / "b.png"], 32, dtype=torch.float64)
    assert out.shape == (2, 3, 32, 32) and out.dtype == torch.float64
    torch.testing.assert_close(out[0], EvalTransform(32)(a).double())
    torch.testing.assert_close(out[1], EvalTransform(32)(b).double())
    assert prepare_images(str(tmp_path / "b.png"), 32).shape == (1, 3, 32, 32)
    (tmp_path / "bad.jpg").write_text("nope")
    with pytest.raises(ImageError, match=r"images\[1\].*bad\.jpg"):
        prepare_images([a, tmp_path / "bad.jpg"], 32)
    with pytest.raises(ImageError):
        prepare_images([], 32)


def _sources(tmp_path):
    """A slow first item (a large PNG), then quick ones, a bad file, a tensor and a PIL image."""
    Image.fromarray(noise(1500, 2000, seed=3)).save(tmp_path / "big.png")
    items = [tmp_path / "big.png"]
    for i in range(5):
        Image.fromarray(noise(30 + i, 40, seed=10 + i)).save(tmp_path / f"s{i}.png")
        items.append(str(tmp_path / f"s{i}.png"))
    (tmp_path / "bad.jpg").write_text("not a picture")
    items.insert(3, tmp_path / "bad.jpg")
    items.append(torch.randn(3, 32, 32))
    items.append(Image.fromarray(noise(20, 20, seed=99)))
    return items


@pytest.mark.parametrize("workers", [1, 3])
def test_iter_images_threads_keep_order_and_values(tmp_path, workers):
    items = _sources(tmp_path)
    serial = list(iter_images(items, 32, workers=0))
    threaded = list(iter_images(items, 32, workers=workers, ahead=4))
    assert [i for i, _ in threaded] == list(range(len(items)))
    for (_, a), (_, b), item in zip(serial, threaded, items):
        if isinstance(a, ImageError):
            assert isinstance(b, ImageError) and str(a) == str(b) and "bad.jpg" in str(b)
        else:
            assert torch.equal(a, b) and b.shape == (3, 32, 32)
            if isinstance(item, torch.Tensor):
                assert torch.equal(b, item)
            else:
                torch.testing.assert_close(b, EvalTransform(32)(item), rtol=0, atol=0)
    assert sum(isinstance(b, ImageError) for _, b in threaded) == 1


def test_iter_images_repeated_lazy_image_and_file_object(tmp_path):
    Image.fromarray(noise(600, 800, seed=5)).save(tmp_path / "a.jpg", quality=90)
    expected = EvalTransform(32)(tmp_path / "a.jpg")
    lazy = Image.open(tmp_path / "a.jpg")  # not decoded yet: every thread would read the same file
    with open(tmp_path / "a.jpg", "rb") as fp:
        shared_fp = io.BytesIO(fp.read())
    out = list(iter_images([lazy] * 6, 32, workers=4, ahead=6))
    assert all(torch.equal(x, expected) for _, x in out)
    out = list(iter_images([shared_fp] * 3 + [tmp_path / "a.jpg"] * 2, 32, workers=4))
    assert all(torch.equal(x, expected) for _, x in out)


def test_iter_images_stopped_early_leaves_no_threads(tmp_path):
    import threading
    items = [Image.fromarray(noise(200, 200, seed=i)) for i in range(40)]
    it = iter_images(items, 32, workers=2, ahead=8)
    first = [next(it) for _ in range(3)]
    assert [i for i, _ in first] == [0, 1, 2]
    it.close()  # the caller breaks out: queued work is dropped, the pool is shut down
    assert not [t for t in threading.enumerate() if t.name.startswith("blip-image")]


def test_image_batches_sizes_and_global_error_index(tmp_path):
    items = [Image.fromarray(noise(20, 30, seed=i)) for i in range(7)]
    batches = list(image_batches(items, 16, 3, workers=2))
    assert [b.shape[0] for b in batches] == [3, 3, 1]
    torch.testing.assert_close(torch.cat(batches), prepare_images(items, 16, workers=0), rtol=0, atol=0)
    x = torch.randn(5, 3, 16, 16)
    assert [b.shape[0] for b in image_batches(x, 16, 2)] == [2, 2, 1]
    (tmp_path / "bad.jpg").write_text("nope")
    with pytest.raises(ImageError, match=r"images\[5\].*bad\.jpg"):
        list(image_batches(items[:5] + [tmp_path / "bad.jpg"], 16, 2, workers=2))
    with pytest.raises(ValueError):
        list(image_batches(items, 16, 0))
    with pytest.raises(ImageError):
        list(image_batches([], 16, 2))


def test_train_transform_without_flip_never_mirrors():
    img = Image.new("RGB", (64, 64), (0, 0, 0))
    img.paste((255, 255, 255), (0, 0, 16, 64))  # a white band on the left only
    t = TrainTransform(32, min_scale=1.0, randaugment=False, hflip=False)
    flipping = TrainTransform(32, min_scale=1.0, randaugment=False)
    mirrored = 0
    for seed in range(12):
        x = t(img, generator=np.random.default_rng(seed))
        assert x[:, :, :4].mean() > x[:, :, -4:].mean()  # white stays left
        y = flipping(img, generator=np.random.default_rng(seed))
        mirrored += bool(y[:, :, :4].mean() < y[:, :, -4:].mean())
    assert 0 < mirrored < 12  # the flipping transform does mirror some draws
