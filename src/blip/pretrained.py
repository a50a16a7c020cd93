"""Where released weights live, and how a name becomes a local file.

Official `.pth` files are addressed by their file stem (`model_base_caption_capfilt_large`), Hugging
Face repositories by their hub id (`Salesforce/blip-image-captioning-base`). Downloads go to
`$BLIP_CACHE` (default `~/.cache/blip`) and are reused.
"""
from __future__ import annotations

import os
import re
import shutil
import tempfile
import urllib.request
from pathlib import Path

from .checkpoint import CheckpointError

OFFICIAL_URL = "https://storage.googleapis.com/sfr-vision-language-research/BLIP/models/{}.pth"

OFFICIAL = {  # name -> task
    "model_base_14M": "pretrain", "model_base": "pretrain", "model_base_capfilt_large": "pretrain",
    "model_large": "pretrain",
    "model_base_retrieval_coco": "retrieval", "model_large_retrieval_coco": "retrieval",
    "model_base_retrieval_flickr": "retrieval", "model_large_retrieval_flickr": "retrieval",
    "model_base_caption_capfilt_large": "caption", "model_large_caption": "caption",
    "model_vqa": "vqa", "model_base_vqa_capfilt_large": "vqa",
}

HUB = {  # the Salesforce repositories transformers publishes
    "Salesforce/blip-image-captioning-base", "Salesforce/blip-image-captioning-large",
    "Salesforce/blip-itm-base-coco", "Salesforce/blip-itm-large-coco", "Salesforce/blip-itm-base-flickr",
    "Salesforce/blip-itm-large-flickr", "Salesforce/blip-vqa-base", "Salesforce/blip-vqa-capfilt-large",
}

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def cache_dir() -> Path:
    return Path(os.environ.get("BLIP_CACHE", Path.home() / ".cache" / "blip"))


def _download(url: str, dest: Path) -> Path:
    if dest.exists():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    from tqdm import tqdm
    try:
        with urllib.request.urlopen(url, timeout=60) as resp:
            total = int(resp.headers.get("Content-Length", 0)) or None
            with tempfile.NamedTemporaryFile(dir=dest.parent, delete=False) as tmp, \
                    tqdm(total=total, unit="B", unit_scale=True, desc=dest.name) as bar:
                while chunk := resp.read(1 << 20):
                    tmp.write(chunk)
                    bar.update(len(chunk))
        shutil.move(tmp.name, dest)  # atomic within one folder: no half-written file is ever reused
    except OSError as e:
        raise CheckpointError(f"could not download {url}: {e}") from None
    return dest


def resolve(name_or_path: str | os.PathLike) -> tuple[Path, str | None]:
    """A local path for a path, an official name or URL, or a hub id; plus the task it implies."""
    text = str(name_or_path)
    path = Path(text).expanduser()
    if path.exists():
        return path, None
    if text in OFFICIAL:
        return _download(OFFICIAL_URL.format(text), cache_dir() / f"{text}.pth"), OFFICIAL[text]
    if text.startswith(("http://", "https://")):
        return _download(text, cache_dir() / Path(text.split("?")[0]).name), None
    if _HUB_ID.match(text) and not text.startswith(("./", "../")):
        try:
            from huggingface_hub import snapshot_download
            folder = snapshot_download(text, allow_patterns=["config.json", "*.safetensors", "pytorch_model.bin"])
        except Exception as e:  # offline, unknown repo, gated, ...
            first = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise CheckpointError(f"could not fetch hub id {text!r}: {first}") from None
        return Path(folder), None
    raise CheckpointError(f"checkpoint not found: {text} (not a file, folder, official model name or hub id)")
