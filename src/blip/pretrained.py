"""Where released weights live, and how a name becomes a local file.

Official `.pth` files are addressed by their file stem (`model_base_caption_capfilt_large`), Hugging
Face repositories by their hub id (`Salesforce/blip-image-captioning-base`). Downloads go to
`$BLIP_CACHE` (default `~/.cache/blip`) and are reused.
"""
from __future__ import annotations

import hashlib
import http.client
import os
import re
import tempfile
import urllib.parse
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
    "model_base_nlvr": "nlvr",
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
    """`url` to `dest` once: written to a temporary file in the same folder and renamed only when the
    whole body arrived (a cut connection leaves nothing behind that a later load would trust)."""
    if dest.exists():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    from tqdm import tqdm
    partial = None  # the temporary file until it is complete and renamed; removed on any failure
    try:
        with urllib.request.urlopen(url, timeout=60) as resp:
            total = int(resp.headers.get("Content-Length", 0)) or None
            got = 0
            with tempfile.NamedTemporaryFile(dir=dest.parent, prefix=f".{dest.name}.", delete=False) as tmp, \
                    tqdm(total=total, unit="B", unit_scale=True, desc=dest.name) as bar:
                partial = Path(tmp.name)
                while chunk := resp.read(1 << 20):
                    tmp.write(chunk)
                    got += len(chunk)
                    bar.update(len(chunk))
        if total is not None and got != total:
            raise OSError(f"connection closed after {got} of {total} bytes")
        os.replace(partial, dest)  # atomic within one folder
        partial = None
    except (OSError, ValueError, http.client.HTTPException) as e:
        raise CheckpointError(f"could not download {url}: {_first_line(e)}") from None
    finally:  # also on Ctrl-C
        if partial is not None:
            partial.unlink(missing_ok=True)
    return dest


def _first_line(e: BaseException) -> str:
    return str(e).splitlines()[0] if str(e) else type(e).__name__


def url_cache_path(url: str) -> Path:
    """Where a URL's download is kept: its file name under a folder named by the URL's hash, so two
    URLs that end in the same name (v1/model.pth, v2/model.pth) never share a file."""
    digest = hashlib.sha256(url.encode()).hexdigest()[:16]
    name = Path(urllib.parse.urlsplit(url).path).name or "checkpoint.pth"
    return cache_dir() / "urls" / digest / name


def _hub_snapshot(repo_id: str) -> Path:
    """The repository's config and ONE copy of its weights: safetensors (and shard index) when it has
    them, else the PyTorch files (read weights-only). Salesforce's BLIP repositories carry both, and
    fetching every format would double a ~1-2 GB download."""
    from huggingface_hub import snapshot_download
    folder = Path(snapshot_download(repo_id, allow_patterns=["config.json", "*.safetensors",
                                                             "*.safetensors.index.json"]))
    if not any(folder.glob("*.safetensors")):
        folder = Path(snapshot_download(repo_id, allow_patterns=["config.json", "pytorch_model*.bin",
                                                                 "pytorch_model.bin.index.json"]))
    return folder


def resolve(name_or_path: str | os.PathLike) -> tuple[Path, str | None]:
    """A local path for a path, an official name or URL, or a hub id; plus the task it implies."""
    text = str(name_or_path)
    path = Path(text).expanduser()
    if path.exists():
        return path, None
    if text in OFFICIAL:
        return _download(OFFICIAL_URL.format(text), cache_dir() / f"{text}.pth"), OFFICIAL[text]
    if text.startswith(("http://", "https://")):
        return _download(text, url_cache_path(text)), None
    if _HUB_ID.match(text) and not text.startswith(("./", "../")):
        try:
            return _hub_snapshot(text), None
        except Exception as e:  # offline, unknown repo, gated, ...
            raise CheckpointError(f"could not fetch hub id {text!r}: {_first_line(e)}") from None
    raise CheckpointError(f"checkpoint not found: {text} (not a file, folder, official model name or hub id)")
