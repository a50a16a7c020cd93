"""What a request may hold, and the one error type the handlers raise: ApiError -> a JSON answer.

Uploads are checked in the cheap order: body bytes (before the form is parsed), then the image
header (format, pixel count: a decompression bomb is refused before a pixel is decoded), then the
full decode.
"""
from __future__ import annotations

import io
import warnings
from dataclasses import dataclass

from PIL import Image, UnidentifiedImageError

from blip.transform import ImageError, load_image


@dataclass
class Limits:
    upload_bytes: int = 10 * 2**20   # one image upload
    pixels: int = 40_000_000          # width x height, read from the header before decoding
    text_chars: int = 1000            # one text, question, label or prompt
    texts: int = 32                   # texts in /match and /embed
    labels: int = 100                 # labels in /classify
    answers: int = 5000               # candidate answers in /vqa
    k: int = 100                      # results in /search

    @property
    def body_bytes(self) -> int:
        """A whole request body: the image plus room for the form's text fields."""
        return self.upload_bytes + 2**20


class ApiError(Exception):
    """An answer other than 200: status, a short kind and a one-line message."""

    def __init__(self, status: int, kind: str, message: str):
        super().__init__(message)
        self.status, self.kind, self.message = status, kind, message


def check_texts(texts: list[str], what: str, most: int, chars: int) -> list[str]:
    if not texts:
        raise ApiError(422, "invalid", f"give at least one {what}")
    if len(texts) > most:
        raise ApiError(422, "too_many", f"at most {most} {what}s per request, got {len(texts)}")
    for t in texts:
        check_text(t, what, chars)
    return texts


def check_text(text: str, what: str, chars: int) -> str:
    if not text.strip():
        raise ApiError(422, "invalid", f"empty {what}")
    if len(text) > chars:
        raise ApiError(422, "too_long", f"{what} longer than {chars} characters ({len(text)})")
    return text


def decode_image(data: bytes, limits: Limits) -> Image.Image:
    """Upload bytes -> RGB PIL image, or ApiError 413 (too many bytes or pixels), 415 (not an image),
    422 (an image, but corrupt or truncated)."""
    if len(data) > limits.upload_bytes:
        raise ApiError(413, "too_large", f"image upload of {len(data)} bytes exceeds {limits.upload_bytes} bytes")
    if not data:
        raise ApiError(422, "invalid", "the image upload is empty")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # Pillow's bomb warning: our own bound is checked next
            header = Image.open(io.BytesIO(data))
        w, h = header.size
    except Image.DecompressionBombError as e:
        raise ApiError(413, "too_large", f"image has too many pixels ({e})") from None
    except UnidentifiedImageError:
        raise ApiError(415, "not_an_image", "the upload is not an image in a known format") from None
    except Exception as e:  # a header so broken Pillow's plugin raises while parsing it
        raise ApiError(415, "not_an_image", f"the upload is not a readable image ({type(e).__name__})") from None
    if w * h > limits.pixels:
        raise ApiError(413, "too_large", f"image of {w}x{h} = {w * h} pixels exceeds {limits.pixels} pixels")
    try:
        return load_image(data)
    except ImageError as e:
        raise ApiError(422, "bad_image", str(e).replace(f"<{len(data)} bytes>", "upload")) from None
