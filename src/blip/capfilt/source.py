"""CapFilt's input: web image-text pairs from an official JSON list or webdataset shards, cut into parts.

A part is the unit of work and of crash safety: a fixed slice of a JSON list (part_size items) or one
shard, processed by one rank and written atomically. Parts are a function of the input alone, so a
rerun, another batch size of ranks, or a resumed run sees the same parts.

Items carry the raw image bytes (they are copied into the output shards) and are decoded in threads,
once, then resized for each model's image size.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import posixpath
import tarfile
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from ..data.datasets import IMAGE_EXTS, _read_shard, _sample_caption, expand_shards
from ..transform import EvalTransform, ImageError, default_workers, load_image

log = logging.getLogger("blip.capfilt")
NO_LABEL = object()  # the input carries no noise label for this item


@dataclass(frozen=True)
class Part:
    index: int
    source: str          # what the manifest records: "data.json[0:1000]" or the shard's path
    shard: str | None = None
    start: int = 0
    stop: int = 0


@dataclass
class WebItem:
    key: str             # the image's key: seeds its synthetic captions and names its output samples
    image: str           # how bootstrapped.json names the image
    caption: object      # the web text (None or a non-string: no usable text)
    noise: object        # the input's noise label, or NO_LABEL
    data: bytes | None = None   # image bytes (shards), or None: read from `path`
    path: str | None = None
    ext: str = "jpg"


class Source:
    """The input's parts and their items. `data`: a JSON list file, shards (a folder of .tar, a glob, a
    brace range, or a list of paths), or a Python list of {"image": path, "caption": str, "noise"?}."""

    def __init__(self, data, image_root=None, part_size: int = 1000, out_dir=None):
        if not isinstance(part_size, int) or part_size < 1:
            raise ValueError(f"part_size must be a positive integer, got {part_size!r}")
        self.part_size = part_size
        self.out_dir = Path(out_dir).resolve() if out_dir is not None else None
        self.items: list | None = None
        if isinstance(data, (list, tuple)) and data and all(isinstance(d, dict) for d in data):
            digest = hashlib.sha1(json.dumps(data, sort_keys=True, default=str).encode("utf-8")).hexdigest()[:16]
            self.description = f"<list of {len(data)} items, sha1 {digest}>"  # a changed list is another run
            self._set_items(list(data), Path(image_root) if image_root else Path.cwd(), "items")
        elif isinstance(data, (str, os.PathLike)) and str(data).endswith(".json"):
            path = Path(data)
            if not path.is_file():
                raise ValueError(f"annotation file not found: {path}")
            try:
                items = json.loads(path.read_text(encoding="utf-8"))
            except (UnicodeDecodeError, ValueError) as e:
                raise ValueError(f"{path}: not a JSON list ({str(e).splitlines()[0]})") from None
            if not isinstance(items, list):
                raise ValueError(f"{path}: expected a JSON list of {{image, caption}}, got {type(items).__name__}")
            self.description = os.fspath(path)
            self._set_items(items, Path(image_root) if image_root else path.parent, path.name)
        else:
            if not isinstance(data, (str, os.PathLike)) and any(str(d).endswith(".json") for d in data):
                raise ValueError("give one JSON list (concatenate several first), or webdataset shards")
            shards = expand_shards(data)
            missing = [s for s in shards if not os.path.isfile(s)]
            if not shards or missing:
                raise ValueError(f"no input shards at {missing[0] if missing else data}: give a JSON list, "
                                 "a folder of .tar shards, a glob or a list of shard paths")
            self.description = shards
            self.parts = [Part(i, os.fspath(s), shard=os.fspath(s)) for i, s in enumerate(shards)]

    def _set_items(self, items: list, root: Path, name: str) -> None:
        for k, it in enumerate(items):
            if not isinstance(it, dict) or not isinstance(it.get("image"), str):
                raise ValueError(f"{name}: entry {k} has no \"image\" path")
        self.items, self.root = items, root
        n = self.part_size
        self.parts = [Part(i, f"{name}[{s}:{min(s + n, len(items))}]", start=s, stop=min(s + n, len(items)))
                      for i, s in enumerate(range(0, len(items), n))]

    def size(self, part: Part) -> int | None:
        return part.stop - part.start if part.shard is None else None

    def read(self, part: Part):
        """The part's WebItems, in input order."""
        if part.shard is None:
            for i in range(part.start, part.stop):
                yield self._json_item(i)
            return
        try:
            for key, files in _read_shard(part.shard):
                ext = next((e for e in IMAGE_EXTS if e in files), None)
                caption, meta = _sample_caption(files)
                name = meta.get("url") or meta.get("image") or f"{posixpath.basename(part.shard)}/{key}.{ext}"
                yield WebItem(key=key, image=str(name), caption=caption, noise=meta.get("noise", NO_LABEL),
                              data=files.get(ext, b"") if ext else b"", ext=ext or "jpg")
        except (tarfile.TarError, OSError, EOFError) as e:  # the samples before the damage are used
            log.warning("shard %s is unreadable or truncated (%s: %s); its remaining samples are skipped",
                        part.shard, type(e).__name__, e)

    def _json_item(self, i: int) -> WebItem:
        it = self.items[i]
        path = it["image"] if os.path.isabs(it["image"]) else str(self.root / it["image"])
        # bootstrapped.json sits in the output folder: name the image relative to it, so the official
        # loaders (paths relative to the JSON's folder) find it
        image = os.path.relpath(os.path.abspath(path), self.out_dir) if self.out_dir else it["image"]
        ext = Path(path).suffix.lower().lstrip(".") or "jpg"
        return WebItem(key=str(it.get("key", f"{i:09d}")), image=image, caption=it.get("caption"),
                       noise=it.get("noise", NO_LABEL), path=path, ext=ext)


def _decode(item: WebItem, sizes: tuple[int, ...]):
    """(image bytes, {size: normalised tensor}) or the ImageError saying why not."""
    try:
        data = item.data
        if data is None:
            try:
                data = Path(item.path).read_bytes()
            except OSError as e:
                raise ImageError(f"cannot load image {item.path}: {e.strerror or e}") from None
        if not data:
            raise ImageError(f"sample {item.key} has no image")
        img = load_image(data)
        return data, {s: EvalTransform(s)(img) for s in sizes}
    except ImageError as e:
        return e


def decoded(items, sizes: tuple[int, ...], workers: int | None = None, ahead: int = 32):
    """Yield (item, bytes and tensors or ImageError) in order, decoding `ahead` items in threads."""
    workers = default_workers() if workers is None else int(workers)
    if workers <= 0:
        for item in items:
            yield item, _decode(item, sizes)
        return
    pool = ThreadPoolExecutor(workers, thread_name_prefix="blip-capfilt")
    pending = deque()
    source = iter(items)
    try:
        while True:
            while len(pending) < max(1, ahead):
                item = next(source, None)
                if item is None:
                    break
                pending.append((item, pool.submit(_decode, item, sizes)))
            if not pending:
                return
            item, future = pending.popleft()
            yield item, future.result()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
