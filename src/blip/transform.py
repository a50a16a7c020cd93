"""
Image loading and the BLIP image transforms, with Pillow + numpy + torch only.

Read top to bottom:
  1. constants and ImageError
  2. load_image: any path / bytes / file / PIL image -> 8-bit RGB PIL image
  3. to_tensor, normalize
  4. EvalTransform (square bicubic resize, as the official BLIP eval pipeline)
  5. random_resized_crop_params + TrainTransform (RandomResizedCrop, flip, RandomAugment)
  6. RandomAugment: the official BLIP cv2 augmentation re-done in numpy
  7. iter_images / prepare_images: batches for the model, decoded in threads

All randomness goes through an explicit numpy Generator, so a seed reproduces a
training sample exactly and nothing touches global RNG state.
"""

import contextlib
import io
import math
import os
import random
import threading

import numpy as np
import torch
from PIL import ExifTags, Image, ImageOps, UnidentifiedImageError

# -----------------------------------------------------------------------------
# constants

# BLIP normalises with the OpenAI CLIP statistics (not the ImageNet ones).
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# Largest image we agree to decode: 16384 x 16384 = 268M pixels (~800 MB as RGB).
# Pillow's own decompression-bomb guard warns at 89M and refuses at 179M pixels,
# which would reject ordinary 10000x10000 scans, so we apply this bound instead.
MAX_PIXELS = 16384 * 16384

BICUBIC = Image.Resampling.BICUBIC


class ImageError(ValueError):
    """An image could not be loaded or used; the message names the source."""


# -----------------------------------------------------------------------------
# loading

_PILLOW_LIMIT_LOCK = threading.Lock()


@contextlib.contextmanager
def _pillow_limit_lifted(pixels=None):
    """Switch off Pillow's bomb guard (a process-global) while we open/crop an image
    that MAX_PIXELS allows. Only lifted when needed (header parsing, or images above
    Pillow's limit), under a lock, and always restored."""
    limit = Image.MAX_IMAGE_PIXELS
    if pixels is not None and (limit is None or pixels <= limit):
        yield
        return
    with _PILLOW_LIMIT_LOCK:
        saved = Image.MAX_IMAGE_PIXELS
        Image.MAX_IMAGE_PIXELS = None
        try:
            yield
        finally:
            Image.MAX_IMAGE_PIXELS = saved


def _describe(src):
    """A short printable name for an image source, for error messages."""
    if isinstance(src, (str, os.PathLike)):
        return repr(os.fspath(src))
    if isinstance(src, (bytes, bytearray, memoryview)):
        return f"<{len(src)} bytes>"
    if isinstance(src, Image.Image):
        name = getattr(src, "filename", "")
        return repr(name) if name else f"<PIL image {src.mode} {src.size[0]}x{src.size[1]}>"
    if isinstance(src, np.ndarray):
        return f"<array {src.dtype} {src.shape}>"
    name = getattr(src, "name", None)
    return repr(name) if isinstance(name, (str, bytes)) else f"<{type(src).__name__}>"


def _one_line(e):
    return f"{type(e).__name__}: {' '.join(str(e).split())}"


def _check_size(img, name):
    w, h = img.size
    if w <= 0 or h <= 0:
        raise ImageError(f"image {name} has zero size ({w}x{h})")
    if w * h > MAX_PIXELS:
        raise ImageError(f"image {name} is too large ({w}x{h} = {w * h} pixels > MAX_PIXELS = {MAX_PIXELS})")


def _high_depth_to_8bit(img):
    """16-bit, 32-bit int and float grayscale -> 'L' by scaling, not clipping.
    Pillow's own convert() clips these to 255, which turns most 16-bit images white.
      I;16*: exact 16->8 bit mapping, v / 257 rounded (65535 -> 255).
      I:     values in 0..255 kept; in 0..65535 treated as 16-bit (/257);
             anything else (negative, > 65535) stretched min..max -> 0..255.
      F:     values in [0,1] times 255; in [0,255] kept; else stretched min..max.
             NaN/inf become 0."""
    a = np.asarray(img)
    if img.mode.startswith("I;16"):
        out = np.rint(a.astype(np.float64) / 257.0)
    else:
        a = a.astype(np.float64)
        a[~np.isfinite(a)] = 0.0
        lo, hi = float(a.min()), float(a.max())
        if img.mode == "F" and lo >= 0.0 and hi <= 1.0:
            out = np.rint(a * 255.0)
        elif lo >= 0.0 and hi <= 255.0:
            out = np.rint(a)
        elif img.mode == "I" and lo >= 0.0 and hi <= 65535.0:
            out = np.rint(a / 257.0)
        else:
            out = np.rint((a - lo) * (255.0 / (hi - lo) if hi > lo else 0.0))
    return Image.fromarray(out.clip(0, 255).astype(np.uint8), mode="L")


def _to_rgb(img):
    """Any Pillow mode -> 'RGB'. Alpha is dropped, not composited, exactly like the
    official `Image.open(p).convert('RGB')`: transparent pixels keep their stored colour."""
    if img.mode == "RGB":
        return img
    if img.mode.startswith("I") or img.mode == "F":
        img = _high_depth_to_8bit(img)
    elif img.mode in ("P", "PA"):
        # via RGBA: same colours as P->RGB, but without Pillow's warning about
        # palette transparency given as bytes
        img = img.convert("RGBA")
    elif img.mode == "La":  # premultiplied; Pillow only converts it to LA
        img = img.convert("LA")
    return img.convert("RGB")


def _exif_transpose(img):
    """Apply the EXIF orientation tag (camera photos are often stored sideways).
    Images without a tag (or orientation 1) are returned as is, without a copy;
    unreadable EXIF metadata is ignored rather than failing the image."""
    try:
        orientation = img.getexif().get(ExifTags.Base.Orientation, 1)
    except Exception:
        return img
    if orientation in (2, 3, 4, 5, 6, 7, 8):
        img = ImageOps.exif_transpose(img)
    return img


def load_image(src, *, draft_size=None):
    """Load `src` as an 8-bit RGB PIL image, or raise ImageError naming the source.

    src: a path (str / os.PathLike), bytes, a binary file object, a PIL image, or a
    uint8/float numpy array (H,W) or (H,W,3). The file is fully decoded here, so a
    truncated file fails now rather than inside a DataLoader later. EXIF orientation
    is applied; animated images (GIF/APNG/WebP) give their first frame.
    draft_size: optional; for JPEGs let the decoder downscale by 2/4/8 while keeping
    both sides >= draft_size. Faster for huge photos, but the pixels then differ
    slightly from the official pipeline, so the transforms do not use it."""
    name = _describe(src)
    own_fp = None
    try:
        if isinstance(src, Image.Image):
            img = src
        elif isinstance(src, np.ndarray):
            try:
                img = Image.fromarray(src)
            except Exception as e:
                raise ImageError(f"cannot make an image from array {name}: {_one_line(e)}") from None
        else:
            if isinstance(src, (str, os.PathLike)):
                path = os.fspath(src)
                if not os.path.exists(path):
                    raise ImageError(f"cannot load image {name}: file not found")
                if not os.path.isfile(path):
                    raise ImageError(f"cannot load image {name}: not a regular file")
                try:
                    fp = own_fp = open(path, "rb")
                except OSError as e:
                    raise ImageError(f"cannot load image {name}: {_one_line(e)}") from None
            elif isinstance(src, (bytes, bytearray, memoryview)):
                fp = own_fp = io.BytesIO(bytes(src))
            elif hasattr(src, "read"):
                fp = src
            else:
                raise ImageError(f"cannot load an image from a {type(src).__name__} ({name})")
            try:
                with _pillow_limit_lifted():  # header only; our own bound is checked next
                    img = Image.open(fp)
            except Exception as e:
                why = "no known image format" if isinstance(e, UnidentifiedImageError) else _one_line(e)
                raise ImageError(f"cannot load image {name}: not a readable image ({why})") from None

        _check_size(img, name)
        if draft_size is not None and img is not src and img.format in ("JPEG", "MPO"):
            w, h = img.size
            if min(w, h) >= 2 * draft_size:
                img.draft(img.mode, (draft_size, draft_size))
        try:
            with _pillow_limit_lifted(img.size[0] * img.size[1]):
                img.load()
                img = _to_rgb(_exif_transpose(img))
                if getattr(img, "is_animated", False):
                    img = img.copy()  # a plain image of frame 0, not tied to the file we close
        except ImageError:
            raise
        except Exception as e:  # decoders raise many types on broken data
            raise ImageError(f"cannot load image {name}: corrupt or truncated ({_one_line(e)})") from None
        return img
    finally:
        if own_fp is not None:
            own_fp.close()


# -----------------------------------------------------------------------------
# tensors

def to_tensor(img):
    """PIL image (or uint8 HxWx3 array) -> float32 (3,H,W) in [0,1], like torchvision's
    ToTensor (uint8 / 255 in float32)."""
    if isinstance(img, Image.Image):
        img = np.asarray(_to_rgb(img))
    a = np.asarray(img)
    if a.dtype != np.uint8 or a.ndim != 3 or a.shape[2] != 3:
        raise ImageError(f"to_tensor wants an RGB image or uint8 (H,W,3) array, got {a.dtype} {a.shape}")
    x = a.astype(np.float32) / np.float32(255.0)
    return torch.from_numpy(np.ascontiguousarray(x.transpose(2, 0, 1)))


def normalize(x):
    """(x - mean) / std with the CLIP statistics, on (3,H,W) or (B,3,H,W), computed in
    x's dtype (as torchvision's Normalize). Returns a new tensor."""
    if x.dim() not in (3, 4) or x.shape[-3] != 3:
        raise ValueError(f"normalize wants (3,H,W) or (B,3,H,W), got {tuple(x.shape)}")
    if x.device.type == "cpu" and x.dtype == torch.float32 and not x.requires_grad:
        # numpy for per-image work: torch's intra-op threads cost more than they save on one
        # small image (9 ms vs 0.1 ms at 128 px), and float32 arithmetic gives the same values
        m = np.asarray(OPENAI_CLIP_MEAN, dtype=np.float32).reshape(3, 1, 1)
        s = np.asarray(OPENAI_CLIP_STD, dtype=np.float32).reshape(3, 1, 1)
        return torch.from_numpy((x.numpy() - m) / s)
    mean = torch.tensor(OPENAI_CLIP_MEAN, dtype=x.dtype, device=x.device).view(3, 1, 1)
    std = torch.tensor(OPENAI_CLIP_STD, dtype=x.dtype, device=x.device).view(3, 1, 1)
    return (x - mean) / std


# -----------------------------------------------------------------------------
# evaluation transform

class EvalTransform:
    """The official BLIP eval pipeline: RGB -> Resize((s,s), BICUBIC) -> ToTensor ->
    Normalize. Square resize without crop: the aspect ratio is not kept, on purpose
    (that is what the released checkpoints were evaluated with)."""

    def __init__(self, image_size: int):
        if int(image_size) <= 0:
            raise ValueError(f"image_size must be positive, got {image_size}")
        self.image_size = int(image_size)

    def __call__(self, img_or_path):
        img = load_image(img_or_path)
        s = self.image_size
        img = img.resize((s, s), BICUBIC)  # what torchvision's Resize does on PIL images
        return normalize(to_tensor(img))

    def __repr__(self):
        return f"EvalTransform(image_size={self.image_size})"


# -----------------------------------------------------------------------------
# training transform

def _as_generator(generator):
    """None -> fresh OS-seeded Generator; int -> seeded; random.Random -> a Generator
    seeded from it (consumes 128 bits of it); numpy Generator -> itself."""
    if generator is None:
        return np.random.default_rng()
    if isinstance(generator, np.random.Generator):
        return generator
    if isinstance(generator, random.Random):
        return np.random.default_rng(generator.getrandbits(128))
    if isinstance(generator, (int, np.integer)) and not isinstance(generator, bool):
        return np.random.default_rng(int(generator))
    raise TypeError(f"generator must be a numpy Generator, random.Random, int or None, not {type(generator).__name__}")


def random_resized_crop_params(width, height, scale, ratio, rng):
    """torchvision RandomResizedCrop.get_params: 10 tries at a box with area fraction
    ~U(scale) and log-aspect ~U(log ratio) that fits; else a central crop clamped to
    the ratio range. Returns (left, top, w, h), always inside the image."""
    if width <= 0 or height <= 0:
        raise ValueError(f"image must be non-empty, got {width}x{height}")
    rng = _as_generator(rng)
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(log_ratio[0], log_ratio[1]))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(rng.integers(0, height - h + 1))
            left = int(rng.integers(0, width - w + 1))
            return left, top, w, h
    in_ratio = width / height
    if in_ratio < min(ratio):
        w = width
        h = int(round(w / min(ratio)))
    elif in_ratio > max(ratio):
        h = height
        w = int(round(h * max(ratio)))
    else:
        w, h = width, height
    return (width - w) // 2, (height - h) // 2, w, h


class TrainTransform:
    """The official BLIP train pipeline:
    RandomResizedCrop(s, scale=(min_scale,1), ratio=(3/4,4/3), BICUBIC) ->
    RandomHorizontalFlip(0.5) -> RandomAugment(2, 5, BLIP_AUGS) -> ToTensor -> Normalize.
    min_scale is 0.5 for finetuning and 0.2 for pretraining in the official configs.
    Randomness comes only from `generator` (see _as_generator), drawn in the same
    order as the official code: crop, flip, then the augmentation ops."""

    def __init__(self, image_size: int, min_scale: float = 0.5, randaugment: bool = True, hflip: bool = True,
                 cache_bytes: int = 512 << 20):
        if int(image_size) <= 0:
            raise ValueError(f"image_size must be positive, got {image_size}")
        if not 0.0 < min_scale <= 1.0:
            raise ValueError(f"min_scale must be in (0, 1], got {min_scale}")
        self.image_size = int(image_size)
        self.scale = (float(min_scale), 1.0)
        self.ratio = (3.0 / 4.0, 4.0 / 3.0)
        self.randaugment = RandomAugment(2, 5, BLIP_AUGS) if randaugment else None
        self.hflip = hflip  # off for data whose captions say left/right (the draw is still made)
        # With min_scale 1 the crop is the whole image (up to rounding), so a file's decoded, cropped and
        # resized pixels repeat every epoch: they are kept, up to cache_bytes, as path -> (size, crop box,
        # pixels); another box for that file is decoded again. Decoding and resizing are most of a small
        # image's loading time, which a CPU step waits for.
        self.cache_bytes = cache_bytes if min_scale == 1.0 else 0
        self._cache: dict = {}
        self._cached_bytes = 0

    def __call__(self, img_or_path, generator=None):
        rng = _as_generator(generator)
        path = os.fspath(img_or_path) if self.cache_bytes and isinstance(img_or_path, (str, os.PathLike)) else None
        size, cached_box, img = self._cache.get(path) or (None, None, None)
        if size is None:
            img = load_image(img_or_path)
            size = img.size
        box = random_resized_crop_params(size[0], size[1], self.scale, self.ratio, rng)
        if box != cached_box:
            if cached_box is not None:  # a rare other crop of a cached file
                img = load_image(img_or_path)
            left, top, w, h = box
            with _pillow_limit_lifted(w * h):  # Image.crop applies Pillow's bomb guard too
                img = img.crop((left, top, left + w, top + h))
            s = self.image_size
            img = img.resize((s, s), BICUBIC)
            if path is not None and cached_box is None and self._cached_bytes + s * s * 3 <= self.cache_bytes:
                self._cache[path] = (size, box, img)
                self._cached_bytes += s * s * 3
        if rng.random() < 0.5 and self.hflip:
            img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        if self.randaugment is not None:
            img = self.randaugment(img, rng)
        return normalize(to_tensor(img))

    def __repr__(self):
        return (f"TrainTransform(image_size={self.image_size}, min_scale={self.scale[0]}, "
                f"randaugment={self.randaugment is not None})")


# -----------------------------------------------------------------------------
# RandomAugment
#
# The official BLIP augmentation (transform/randaugment.py) works on uint8 HxWx3
# arrays with cv2. The ops below reproduce its semantics in numpy:
#   - geometric ops are cv2.warpAffine(INTER_LINEAR, BORDER_CONSTANT) with the same
#     matrices, emulating cv2's fixed-point arithmetic (source coordinates on a 1/32
#     pixel grid, integer weights, round half up), and border pixels blended with the
#     fill value (128,128,128) exactly as cv2 does;
#   - colour ops use the same lookup tables (including truncation, not rounding, and
#     BGR luma weights applied to RGB channels in Color/Contrast, as in the original);
#   - AutoContrast reproduces the original's uint8 overflow by default (see below).

def _warp_affine(img, m, fill):
    """cv2.warpAffine(img, m, (W,H), flags=INTER_LINEAR, borderValue=fill) for uint8
    HxWxC. m is the forward 2x3 map (dst = m @ src), inverted like cv2 does."""
    h, w = img.shape[:2]
    m = np.asarray(m, dtype=np.float64).reshape(-1).copy()
    d = m[0] * m[4] - m[1] * m[3]
    d = 1.0 / d if d != 0 else 0.0
    a11, a22 = m[4] * d, m[0] * d
    m[0], m[1], m[3], m[4] = a11, -m[1] * d, -m[3] * d, a22
    m[2], m[5] = -m[0] * m[2] - m[1] * m[5], -m[3] * m[2] - m[4] * m[5]
    # source coordinate of each destination pixel, in 1/1024 px, then 1/32 px (cv2: AB_BITS=10, INTER_BITS=5)
    xs, ys = np.arange(w, dtype=np.float64), np.arange(h, dtype=np.float64)
    adelta = np.rint(m[0] * xs * 1024).astype(np.int64)
    bdelta = np.rint(m[3] * xs * 1024).astype(np.int64)
    x0 = np.rint((m[1] * ys + m[2]) * 1024).astype(np.int64) + 16
    y0 = np.rint((m[4] * ys + m[5]) * 1024).astype(np.int64) + 16
    sx = (x0[:, None] + adelta[None, :]) >> 5
    sy = (y0[:, None] + bdelta[None, :]) >> 5
    ix, fx = sx >> 5, sx & 31
    iy, fy = sy >> 5, sy & 31
    # pad by one pixel of fill so that any out-of-image neighbour reads the fill value
    c = img.shape[2]
    padded = np.empty((h + 2, w + 2, c), dtype=np.int64)
    padded[...] = np.asarray(fill, dtype=np.int64)[:c]
    padded[1:-1, 1:-1] = img
    cx0, cx1 = np.clip(ix, -1, w) + 1, np.clip(ix + 1, -1, w) + 1
    cy0, cy1 = np.clip(iy, -1, h) + 1, np.clip(iy + 1, -1, h) + 1
    fx, fy = fx[..., None], fy[..., None]
    acc = ((32 - fx) * (32 - fy) * padded[cy0, cx0] + fx * (32 - fy) * padded[cy0, cx1]
           + (32 - fx) * fy * padded[cy1, cx0] + fx * fy * padded[cy1, cx1])
    return ((acc + 512) >> 10).clip(0, 255).astype(np.uint8)


def _lut(img, table):
    return np.asarray(table, dtype=np.uint8)[img]


def identity(img):
    return img


def autocontrast(img, faithful=True):
    """Per channel, stretch min..max to 0..255 (table truncated to int).
    faithful=True reproduces the original code exactly: it computes `-low` on a
    uint8 scalar, which wraps, so any channel whose minimum is > 0 becomes all 255.
    faithful=False is the intended (PIL-style) stretch."""
    out = np.empty_like(img)
    for c in range(img.shape[2]):
        ch = img[..., c]
        low, high = int(ch.min()), int(ch.max())
        if high <= low:
            out[..., c] = ch
        elif faithful and low > 0:
            out[..., c] = 255
        else:
            scale = 255.0 / (high - low)
            table = (np.arange(256) * scale - low * scale).clip(0, 255)
            out[..., c] = _lut(ch, table.astype(np.uint8))
    return out


def equalize(img):
    """Per-channel histogram equalisation with PIL.ImageOps.equalize's table."""
    out = np.empty_like(img)
    for c in range(img.shape[2]):
        ch = img[..., c]
        hist = np.bincount(ch.reshape(-1), minlength=256)
        nonzero = hist[hist != 0]
        step = int(nonzero[:-1].sum()) // 255
        if step == 0:
            out[..., c] = ch
            continue
        n = np.concatenate([[step // 2], hist[:-1]])
        out[..., c] = _lut(ch, (np.cumsum(n) // step).clip(0, 255))
    return out


def rotate(img, degrees, fill=(128, 128, 128)):
    """Counter-clockwise rotation about (W/2, H/2) in cv2 pixel coordinates
    (cv2.getRotationMatrix2D, scale 1), bilinear, borders filled."""
    h, w = img.shape[:2]
    cx, cy = float(np.float32(w / 2)), float(np.float32(h / 2))
    t = degrees * (math.pi / 180)
    a, b = math.cos(t), math.sin(t)
    m = [[a, b, (1 - a) * cx - b * cy], [-b, a, b * cx + (1 - a) * cy]]
    return _warp_affine(img, m, fill)


def solarize(img, thresh=128):
    return _lut(img, [v if v < thresh else 255 - v for v in range(256)])


def color(img, factor):
    """Saturation: blend with a grey image (BGR luma weights, as the original)."""
    m = (np.float32([[0.886, -0.114, -0.114], [-0.587, 0.413, -0.587], [-0.299, -0.299, 0.701]]) * factor
         + np.float32([[0.114], [0.587], [0.299]]))
    return np.matmul(img, m).clip(0, 255).astype(np.uint8)


def contrast(img, factor):
    mean = float(np.sum(np.mean(img, axis=(0, 1)) * np.array([0.114, 0.587, 0.299])))
    return _lut(img, ((np.arange(256) - mean) * factor + mean).clip(0, 255))


def brightness(img, factor):
    return _lut(img, (np.arange(256, dtype=np.float32) * factor).clip(0, 255))


def sharpness(img, factor):
    """Blend with a 3x3 smoothing (1,1,1;1,5,1;1,1,1)/13 of the image; the one-pixel
    border keeps the input (factor 0 uses the blurred image everywhere). The original
    casts out-of-range values to uint8 unclipped (undefined); we clip. At BLIP's
    M=5 the factor is exactly 1.0, i.e. this op is the identity."""
    if factor == 1.0:
        return img
    kernel = np.ones((3, 3), dtype=np.float32)
    kernel[1, 1] = 5
    kernel /= 13
    f = np.pad(img.astype(np.float32), ((1, 1), (1, 1), (0, 0)), mode="reflect")  # cv2 BORDER_REFLECT_101
    h, w = img.shape[:2]
    blur = sum(kernel[i, j] * f[i:i + h, j:j + w] for i in range(3) for j in range(3))
    blur = np.rint(blur).clip(0, 255).astype(np.uint8)
    if factor == 0.0:
        return blur
    out = img.astype(np.float32)
    d = blur.astype(np.float32)[1:-1, 1:-1]
    out[1:-1, 1:-1] = d + factor * (out[1:-1, 1:-1] - d)
    return out.clip(0, 255).astype(np.uint8)


def _f32_matrix(rows):
    return np.array(rows, dtype=np.float32).astype(np.float64)  # the original builds these in float32


def shear_x(img, factor, fill=(128, 128, 128)):
    """dst(x + factor*y, y) = src(x, y)."""
    return _warp_affine(img, _f32_matrix([[1, factor, 0], [0, 1, 0]]), fill)


def shear_y(img, factor, fill=(128, 128, 128)):
    """dst(x, y + factor*x) = src(x, y)."""
    return _warp_affine(img, _f32_matrix([[1, 0, 0], [factor, 1, 0]]), fill)


def translate_x(img, offset, fill=(128, 128, 128)):
    """Content moves LEFT by `offset` pixels: dst(x) = src(x + offset)."""
    return _warp_affine(img, _f32_matrix([[1, 0, -offset], [0, 1, 0]]), fill)


def translate_y(img, offset, fill=(128, 128, 128)):
    """Content moves UP by `offset` pixels: dst(y) = src(y + offset)."""
    return _warp_affine(img, _f32_matrix([[1, 0, 0], [0, 1, -offset]]), fill)


def posterize(img, bits):
    return np.bitwise_and(img, np.uint8((255 << (8 - bits)) & 0xFF))  # the original's uint8 wrap


# magnitude (level 0..10) -> op arguments, as the original's *_level_to_args.
# Shear/Translate flip the sign when rng.random() > 0.5, Rotate when < 0.5.
_MAX_LEVEL = 10
_FILL = (128, 128, 128)


def _no_args(level, rng):
    return ()


def _enhance_args(level, rng):
    return ((level / _MAX_LEVEL) * 1.8 + 0.1,)  # M=5 -> exactly 1.0


def _shear_args(level, rng):
    v = (level / _MAX_LEVEL) * 0.3
    return (-v if rng.random() > 0.5 else v, _FILL)


def _translate_args(level, rng):
    v = (level / _MAX_LEVEL) * 10.0  # translate_const = 10 pixels, so M=5 -> 5 px
    return (-v if rng.random() > 0.5 else v, _FILL)


def _rotate_args(level, rng):
    v = (level / _MAX_LEVEL) * 30.0
    return (-v if rng.random() < 0.5 else v, _FILL)


def _solarize_args(level, rng):
    return (int((level / _MAX_LEVEL) * 256),)


def _posterize_args(level, rng):
    return (int((level / _MAX_LEVEL) * 4),)


AUG_OPS = {  # name -> (op, level_to_args); the original's 14 ops, in its order
    "Identity": (identity, _no_args),
    "AutoContrast": (autocontrast, _no_args),
    "Equalize": (equalize, _no_args),
    "Rotate": (rotate, _rotate_args),
    "Solarize": (solarize, _solarize_args),
    "Color": (color, _enhance_args),
    "Contrast": (contrast, _enhance_args),
    "Brightness": (brightness, _enhance_args),
    "Sharpness": (sharpness, _enhance_args),
    "ShearX": (shear_x, _shear_args),
    "TranslateX": (translate_x, _translate_args),
    "TranslateY": (translate_y, _translate_args),
    "Posterize": (posterize, _posterize_args),
    "ShearY": (shear_y, _shear_args),
}

# the ops BLIP's training configs use
BLIP_AUGS = ("Identity", "AutoContrast", "Brightness", "Sharpness", "Equalize",
             "ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate")


class RandomAugment:
    """BLIP's RandomAugment(N, M): pick n op names uniformly WITH replacement, then
    apply each with probability 0.5 (skipped when rng.random() > 0.5) at magnitude m
    out of 10. augs=None means BLIP_AUGS (the original class defaults to all 14 ops
    and M=10; BLIP always passes 2, 5 and the BLIP_AUGS list).
    faithful_autocontrast: see autocontrast(); True matches the released training."""

    def __init__(self, n=2, m=5, augs=None, faithful_autocontrast=True):
        self.n, self.m = int(n), m
        self.augs = tuple(augs) if augs else BLIP_AUGS
        unknown = [a for a in self.augs if a not in AUG_OPS]
        if unknown:
            raise ValueError(f"unknown augmentation(s) {unknown}; known: {list(AUG_OPS)}")
        self.faithful_autocontrast = faithful_autocontrast

    def __call__(self, img, rng=None):
        rng = _as_generator(rng)
        a = np.asarray(_to_rgb(img)) if isinstance(img, Image.Image) else np.asarray(img)
        if a.dtype != np.uint8 or a.ndim != 3 or a.shape[2] != 3:
            raise ImageError(f"RandomAugment wants an RGB image or uint8 (H,W,3) array, got {a.dtype} {a.shape}")
        names = [self.augs[i] for i in rng.integers(0, len(self.augs), size=self.n)]
        for name in names:
            if rng.random() > 0.5:
                continue
            op, level_to_args = AUG_OPS[name]
            args = level_to_args(self.m, rng)
            if op is autocontrast:
                a = autocontrast(a, faithful=self.faithful_autocontrast)
            else:
                a = op(a, *args)
        return Image.fromarray(np.ascontiguousarray(a), mode="RGB")

    def __repr__(self):
        return f"RandomAugment(n={self.n}, m={self.m}, augs={list(self.augs)})"


# -----------------------------------------------------------------------------
# batching

def default_workers():
    """Threads that decode images: Pillow releases the GIL while it decodes and resizes, so a
    12-megapixel JPEG (~235 ms here) decodes ~2x faster on 2 threads; capped at 8."""
    return min(8, os.cpu_count() or 1)


def _prepared(transform, item, lock=None):
    """One normalised (3,s,s) float32 tensor, or the ImageError that says why not (returned, not
    raised, so that a caller can skip a bad image and keep the others). `lock` serialises threads
    on an object that may appear more than once (a lazily opened PIL image or a file object
    decodes from one shared file position)."""
    if lock is not None:
        with lock:
            return _prepared(transform, item)
    if isinstance(item, torch.Tensor):
        if item.dim() != 3 or item.shape[0] != 3 or not item.is_floating_point():
            return ImageError(f"tensor must be float (3,H,W), got {item.dtype} {tuple(item.shape)}")
        return item.to(dtype=torch.float32, device="cpu")
    try:
        return transform(item)
    except ImageError as e:
        return e


def iter_images(items, image_size, *, workers=None, ahead=32):
    """Yield (index, tensor or ImageError) for each item, in order, each through EvalTransform
    (float (3,H,W) tensors pass through). Decoding runs in `workers` threads (None: default_workers(),
    0: in the caller's thread), up to `ahead` items beyond the one the caller holds, so the next
    batch decodes while the model runs on this one; a GPU otherwise waits on one CPU thread's JPEG
    decoding (4 images/s for 12-megapixel photos here)."""
    transform = EvalTransform(image_size)
    workers = default_workers() if workers is None else int(workers)
    if workers <= 0:
        for i, item in enumerate(items):
            yield i, _prepared(transform, item)
        return
    from collections import deque
    from concurrent.futures import ThreadPoolExecutor
    pool = ThreadPoolExecutor(workers, thread_name_prefix="blip-image")
    pending = deque()
    source = enumerate(items)
    locks = {}  # id -> Lock for stateful items (PIL images, file objects), which a list may repeat
    try:
        while True:
            while len(pending) < max(1, ahead):
                nxt = next(source, None)
                if nxt is None:
                    break
                i, item = nxt
                shared = isinstance(item, Image.Image) or hasattr(item, "read")
                lock = locks.setdefault(id(item), threading.Lock()) if shared else None
                pending.append((i, pool.submit(_prepared, transform, item, lock)))
            if not pending:
                return
            i, future = pending.popleft()
            yield i, future.result()
    finally:  # also when the caller stops early: drop what was queued, wait for what is running
        pool.shutdown(wait=True, cancel_futures=True)


def prepare_images(images, image_size, device=None, dtype=None, workers=None):
    """Turn what a user hands the model into a normalised (B,3,s,s) batch.

    images: a list/tuple of paths / PIL images / bytes / file objects (each through
    EvalTransform, decoded in `workers` threads as iter_images does), a single such item, or an
    already-normalised float tensor (3,H,W) or (B,3,H,W) which is passed through untouched apart
    from device/dtype (its H,W may differ from image_size: the ViT interpolates its position
    embedding). Raises ImageError for a bad entry, naming it and its index."""
    if isinstance(images, torch.Tensor):
        x = images
        if x.dim() == 3:
            x = x.unsqueeze(0)
        if x.dim() != 4 or x.shape[1] != 3:
            raise ImageError(f"image tensor must be (3,H,W) or (B,3,H,W), got {tuple(images.shape)}")
        if not x.is_floating_point():
            raise ImageError(f"image tensor must be float and already normalised, got {x.dtype}")
        return x.to(device=device, dtype=dtype)
    items = images if isinstance(images, (list, tuple)) else [images]
    with contextlib.closing(image_batches(items, image_size, max(1, len(items)), workers=workers)) as batches:
        return next(batches).to(device=device, dtype=dtype)


def _stack_images(tensors):
    """(3,H,W) tensors of one size -> a (B,3,H,W) batch."""
    if len({tuple(t.shape) for t in tensors}) != 1:
        raise ImageError(f"images have different sizes: {sorted({tuple(t.shape) for t in tensors})}")
    return torch.stack(tensors)


def image_batches(images, image_size, batch_size, *, workers=None):
    """(B,3,s,s) float32 CPU batches of at most `batch_size`, in order, from anything prepare_images
    takes; with `workers` threads the next batch decodes while the caller works on this one.
    Raises ImageError naming the index of a bad entry."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if isinstance(images, torch.Tensor):
        x = prepare_images(images, image_size)
        for start in range(0, x.shape[0], batch_size):
            yield x[start:start + batch_size]
        return
    if not isinstance(images, (list, tuple)):
        images = [images]
    if len(images) == 0:
        raise ImageError("got an empty list of images")
    if len(images) == 1 or all(isinstance(item, torch.Tensor) for item in images):
        workers = 0  # nothing to decode in parallel
    chunk = []
    for i, x in iter_images(images, image_size, workers=workers, ahead=2 * batch_size):
        if isinstance(x, ImageError):
            raise ImageError(f"images[{i}]: {x}") from None
        chunk.append(x)
        if len(chunk) == batch_size:
            yield _stack_images(chunk)
            chunk = []
    if chunk:
        yield _stack_images(chunk)
