"""
Training datasets: official JSON annotation lists (map-style) and webdataset tar shards (streaming).

Why these rules:
  - bad data never stops a run: an undecodable image or an empty caption is skipped and counted,
    because web corpora always hold some;
  - reproducible: the train transform's randomness for a sample comes from (seed, epoch, sample),
    not from global state, so a rerun (or a resumed run) sees the same augmented pixels;
  - resumable: ShardDataset can restart mid-epoch at the exact sample a training loop stopped at.

Read top to bottom:
  1. helpers: transform calls, collate
  2. JsonCaptionDataset
  3. shard reading: expand_shards, _read_shard
  4. ShardDataset
"""
from __future__ import annotations

import glob
import inspect
import json
import logging
import os
import posixpath
import re
import tarfile
import zlib
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset, IterableDataset, get_worker_info

from ..tokenizer import pre_caption
from ..transform import ImageError, TrainTransform, load_image

log = logging.getLogger("blip.data")
MAX_WARNINGS = 10  # per dataset object; a corpus with 1% bad samples should not flood the log
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")

# -----------------------------------------------------------------------------
# helpers


def _takes_generator(transform) -> bool:
    """TrainTransform takes generator=; EvalTransform and plain callables do not."""
    try:
        return "generator" in inspect.signature(transform).parameters
    except (TypeError, ValueError):
        return False


def _clean_text(caption, prompt: str, max_words: int) -> str | None:
    """The official caption: prompt + pre_caption(caption); None when nothing is left."""
    if not isinstance(caption, str):
        return None
    text = pre_caption(caption, max_words)
    return prompt + text if text else None


def collate(batch: list) -> dict | None:
    """Drop None items (skipped samples), stack tensors, make ints a LongTensor, keep the rest as lists.

    Returns None when every item was skipped: a training loop should `continue` on None.
    """
    items = [b for b in batch if b is not None]
    if not items:
        return None
    out = {}
    for k in items[0]:
        values = [item[k] for item in items]
        if isinstance(values[0], torch.Tensor):
            out[k] = torch.stack(values)
        elif isinstance(values[0], (int, np.integer)) and not isinstance(values[0], bool):
            out[k] = torch.tensor(values, dtype=torch.long)
        else:
            out[k] = values
    return out


class _Warner:
    """Logs the first MAX_WARNINGS skipped samples, then says it stops."""

    def __init__(self):
        self.n = 0

    def __call__(self, msg: str):
        self.n += 1
        if self.n <= MAX_WARNINGS:
            last = " (further skips are counted, not logged)" if self.n == MAX_WARNINGS else ""
            log.warning("skipping %s%s", msg, last)


# -----------------------------------------------------------------------------
# JSON annotation lists

class JsonCaptionDataset(Dataset):
    """Image-caption pairs from one or several official JSON lists (pretrain / coco_karpathy_train style).

    Each file is a list of {"image": path, "caption": str or [str], "image_id"?: ...}; files are
    concatenated in order. Relative image paths resolve against image_root, else the JSON file's
    folder. A list caption gives one caption drawn per (seed, epoch, index).

    __getitem__ returns {"image": (3,H,W) float, "text": prompt + pre_caption(caption), "index": i,
    "image_id": int} or None for a sample that cannot be used (counted in skipped_images /
    skipped_texts of the process that loaded it). Use `collate` to drop the Nones. image_id is a
    contiguous int per distinct annotation image_id (else per image path), as the official
    coco_karpathy_train returns it for retrieval finetuning. Splitting by rank is the sampler's
    job (DistributedSampler).
    """

    def __init__(self, files, image_root=None, transform=None, max_words: int = 30, prompt: str = "",
                 image_size: int = 384, seed: int = 0):
        files = [files] if isinstance(files, (str, os.PathLike)) else list(files)
        if not files:
            raise ValueError("JsonCaptionDataset needs at least one annotation file")
        self.paths, self.captions, self.image_ids = [], [], []
        ids: dict = {}
        for f in files:
            with open(f, encoding="utf-8") as fh:
                anns = json.load(fh)
            if not isinstance(anns, list):
                raise ValueError(f"{f}: expected a JSON list of annotations, got {type(anns).__name__}")
            root = Path(image_root) if image_root is not None else Path(f).parent
            for k, ann in enumerate(anns):
                if not isinstance(ann, dict) or not isinstance(ann.get("image"), str):
                    raise ValueError(f"{f}: entry {k} has no \"image\" path")
                path = ann["image"] if os.path.isabs(ann["image"]) else str(root / ann["image"])
                self.paths.append(path)
                self.captions.append(ann.get("caption"))
                self.image_ids.append(ids.setdefault(ann.get("image_id", path), len(ids)))
        self.transform = transform if transform is not None else TrainTransform(image_size)
        self._rng_transform = _takes_generator(self.transform)
        self.max_words, self.prompt, self.seed = max_words, prompt, seed
        self.epoch = 0
        self.skipped_images = self.skipped_texts = 0
        self._warn = _Warner()

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> dict | None:
        rng = np.random.default_rng([self.seed, self.epoch, i])
        caption = self.captions[i]
        if isinstance(caption, list):
            caption = caption[int(rng.integers(len(caption)))] if caption else None
        text = _clean_text(caption, self.prompt, self.max_words)
        if text is None:
            self.skipped_texts += 1
            self._warn(f"item {i} ({self.paths[i]}): empty caption")
            return None
        try:
            path = self.paths[i]
            image = self.transform(path, generator=rng) if self._rng_transform else self.transform(path)
        except ImageError as e:
            self.skipped_images += 1
            self._warn(f"item {i}: {e}")
            return None
        return {"image": image, "text": text, "index": i, "image_id": self.image_ids[i]}

    def stats(self) -> dict:
        return {"items": len(self), "skipped_images": self.skipped_images, "skipped_texts": self.skipped_texts}


# -----------------------------------------------------------------------------
# tar shards

def expand_shards(urls) -> list[str]:
    """Shard paths from a list, a folder (its *.tar, sorted), a glob, or a brace range
    "shards/pretrain-{00000..00007}.tar" (as webdataset writes them)."""
    if not isinstance(urls, (str, os.PathLike)):
        return [p for u in urls for p in expand_shards(u)]
    url = os.fspath(urls)
    m = re.search(r"\{(\d+)\.\.(\d+)\}", url)
    if m:
        lo, hi, width = int(m.group(1)), int(m.group(2)), len(m.group(1))
        return [p for i in range(lo, hi + 1)
                for p in expand_shards(url[: m.start()] + f"{i:0{width}d}" + url[m.end():])]
    if os.path.isdir(url):
        return sorted(glob.glob(os.path.join(url, "*.tar")))
    if any(c in url for c in "*?["):
        return sorted(glob.glob(url))
    return [url]


def _read_shard(path: str):
    """Yield (key, {extension: bytes}) for each sample of a webdataset tar, streaming.

    Members with the same key (path up to the first dot of the file name) that follow each other
    form one sample, as in webdataset.
    """
    key, files = None, {}
    with tarfile.open(path, mode="r|*") as tar:
        for member in tar:
            if not member.isfile():
                continue
            folder, name = posixpath.split(member.name)
            if "." not in name or name.startswith("."):
                continue
            stem, ext = name.split(".", 1)
            k = posixpath.join(folder, stem)
            data = tar.extractfile(member).read()
            if k != key:
                if files:
                    yield key, files
                key, files = k, {}
            files[ext.lower()] = data
    if files:
        yield key, files


def _sample_caption(files: dict):
    """(caption or None, parsed json or {}): the .txt member, else the json's "caption"."""
    meta = {}
    if "json" in files:
        try:
            meta = json.loads(files["json"].decode("utf-8"))
        except (UnicodeDecodeError, ValueError):
            meta = {}
        if not isinstance(meta, dict):
            meta = {}
    if "txt" in files:
        return files["txt"].decode("utf-8", errors="replace"), meta
    return meta.get("caption"), meta


def _key_number(key: str) -> int:
    """A sample's number for its RNG seed: the key itself when it is digits (img2dataset), else a CRC."""
    stem = posixpath.basename(key)
    return int(stem) if stem.isdigit() else zlib.crc32(key.encode("utf-8"))


def _shuffled(samples, size: int, rng):
    """webdataset-style buffer shuffle: keep `size` samples, emit a random one as each new one arrives."""
    buf = []
    for s in samples:
        if len(buf) < size:
            buf.append(s)
            continue
        j = int(rng.integers(size))
        yield buf[j]
        buf[j] = s
    while buf:
        j = int(rng.integers(len(buf)))
        buf[j], buf[-1] = buf[-1], buf[j]
        yield buf.pop()


class ShardDataset(IterableDataset):
    """Stream image-text samples from webdataset tar shards ({key}.jpg/.png/.webp + {key}.txt/.json).

    Streams: a rank's data is split into one stream per DataLoader worker (one stream without
    workers). Shards go to ranks round-robin (shards[rank::world_size]), then to streams the same
    way; give every rank and stream at least one shard (with fewer, some yield nothing). Ranks
    with unequal sample counts are the training loop's concern.

    Order: a fixed function of (seed, epoch, rank, number of workers). With shuffle_buffer > 0 the
    shard order is permuted per epoch (the same permutation on every rank, so ranks stay disjoint)
    and each stream passes through a shuffle buffer of that size. The train transform's randomness
    for a sample comes from (seed, epoch, key), independent of ranks and workers.

    Items: {"image", "text", "key", "meta" (the sample's json, or {}), "stream": (stream id,
    num_workers; 0 means the main process), "skipped": (bad images, bad captions) skipped by that
    stream since its previous item}. Batch them with `collate`.

    Counting: samples / skipped_images / skipped_texts count what the iterating process sees,
    exact with num_workers=0. With DataLoader workers, call `record(batch)` for each batch the
    loop consumes: it adds the workers' counts here. Unreadable or truncated shards are counted in
    bad_shards (the samples before the damage are used).

    Resume: call `record(batch)` after each consumed batch and save `state_dict()`. After
    `load_state_dict(state)`, a DataLoader with the same num_workers and batch_size (in_order, the
    default) yields exactly the batches the interrupted run would have yielded next: each stream
    skips what it had delivered, and streams are rotated onto workers so that the stream whose
    batch was due next comes first. `skip(n, batch_size)` is the shortcut when the loop only counts
    samples (see its docstring). Skipped samples are decoded to check them, not transformed.
    A resume point holds for its epoch until set_epoch() moves to another. Do not use
    persistent_workers=True: worker copies would miss set_epoch() and loaded states.
    """

    def __init__(self, urls_or_glob, transform=None, max_words: int = 30, shuffle_buffer: int = 0,
                 seed: int = 0, rank: int = 0, world_size: int = 1, image_size: int = 384, prompt: str = ""):
        self.shards = expand_shards(urls_or_glob)
        if not self.shards:
            raise FileNotFoundError(f"no shards match {urls_or_glob!r}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size), got rank={rank} world_size={world_size}")
        self.transform = transform if transform is not None else TrainTransform(image_size)
        self._rng_transform = _takes_generator(self.transform)
        self.max_words, self.prompt = max_words, prompt
        self.shuffle_buffer, self.seed, self.rank, self.world_size = shuffle_buffer, seed, rank, world_size
        self.epoch = 0
        self.samples = self.skipped_images = self.skipped_texts = self.bad_shards = 0
        self._clear_position()
        self._warn = _Warner()
        if len(self.shards) < world_size:
            log.warning("%d shards for %d ranks: some ranks get no data", len(self.shards), world_size)

    def _clear_position(self):
        self._consumed: dict[int, int] = {}  # stream -> samples the loop consumed this epoch (via record)
        self._streams = 1                     # how many streams _consumed refers to
        self._next_stream = 0                 # the stream whose batch is due next
        self._resume: dict[int, int] = {}     # stream -> samples to skip on the next pass
        self._resume_streams, self._rotation = 1, 0
        self._pending_skip = None              # (n, batch_size) from skip(), split once streams are known

    def _apply_pending_skip(self, streams: int) -> None:
        """Turn skip(n, batch_size) into per-stream counts, assuming the DataLoader's round-robin
        over workers (one batch each in turn) with no worker run out of data yet."""
        n, batch_size = self._pending_skip
        if streams == 1:
            consumed, rotation = {0: n}, 0
        else:
            if not batch_size or n % batch_size:
                raise ValueError(f"skip({n}) with {streams} DataLoader workers needs batch_size= (the loader's), "
                                 "and n a multiple of it; or resume with record()/state_dict()")
            k = n // batch_size  # batches consumed: batch j came from stream j % streams
            consumed = {s: (k - s + streams - 1) // streams * batch_size for s in range(min(k, streams))}
            rotation = k % streams
        self._pending_skip = None
        self._consumed, self._resume = consumed, dict(consumed)
        self._streams = self._resume_streams = streams
        self._next_stream = self._rotation = rotation

    # -- order and splitting

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch (shard order, shuffle, augmentation); another epoch drops the resume point."""
        if epoch != self.epoch:
            self.epoch = epoch
            self._clear_position()

    def rank_shards(self) -> list[str]:
        shards = list(self.shards)
        if self.shuffle_buffer > 0:
            shards = [shards[int(i)] for i in np.random.default_rng([self.seed, self.epoch]).permutation(len(shards))]
        return shards[self.rank::self.world_size]

    def _samples(self, shards):
        for shard in shards:
            try:
                for key, files in _read_shard(shard):
                    yield shard, key, files
            except (tarfile.TarError, OSError, EOFError) as e:
                self.bad_shards += 1
                log.warning("shard %s is unreadable or truncated (%s: %s); continuing with the next",
                            shard, type(e).__name__, e)

    # -- iteration

    def __iter__(self):
        info = get_worker_info()
        nw = info.num_workers if info is not None else 0
        streams = max(nw, 1)
        if self._pending_skip is not None:
            self._apply_pending_skip(streams)  # on this process's copy; record() does it on the main object
        if self._resume and self._resume_streams != streams:
            raise ValueError(f"the resume state is for {self._resume_streams} data stream(s) (DataLoader "
                             f"workers) but this run has {streams}")
        stream = ((info.id if info is not None else 0) + self._rotation) % streams
        to_skip = self._resume.get(stream, 0)
        samples = self._samples(self.rank_shards()[stream::streams])
        if self.shuffle_buffer > 1:
            rng = np.random.default_rng([self.seed, self.epoch, self.rank, stream, streams])
            samples = _shuffled(samples, self.shuffle_buffer, rng)
        bad_images = bad_texts = 0
        for shard, key, files in samples:
            caption, meta = _sample_caption(files)
            text = _clean_text(caption, self.prompt, self.max_words)
            ext = next((e for e in IMAGE_EXTS if e in files), None)
            if text is None or ext is None:
                if to_skip == 0:  # bad samples inside the skipped part were counted by the run that saw them
                    bad_texts += text is None
                    bad_images += text is not None
                    self.skipped_texts += text is None
                    self.skipped_images += text is not None
                    self._warn(f"{shard}:{key}: " + ("empty caption" if text is None else "no image member"))
                continue
            if to_skip > 0:
                try:
                    load_image(files[ext])
                    to_skip -= 1
                except ImageError:
                    pass
                continue
            rng = np.random.default_rng([self.seed, self.epoch, _key_number(key)])
            try:
                image = self.transform(files[ext], generator=rng) if self._rng_transform else self.transform(files[ext])
            except ImageError as e:
                bad_images += 1
                self.skipped_images += 1
                self._warn(f"{shard}:{key}: {e}")
                continue
            self.samples += 1
            yield {"image": image, "text": text, "key": key, "meta": meta, "stream": (stream, nw),
                   "skipped": (bad_images, bad_texts)}
            bad_images = bad_texts = 0

    # -- bookkeeping and resume

    def record(self, batch: dict) -> None:
        """Note that the training loop consumed this collated batch: moves the resume point and, for
        batches made by DataLoader workers, adds their skip counts to this object's counters."""
        if self._pending_skip is not None:
            self._apply_pending_skip(max(batch["stream"][0][1], 1))
        for (stream, nw), (bad_images, bad_texts) in zip(batch["stream"], batch["skipped"]):
            self._consumed[stream] = self._consumed.get(stream, 0) + 1
            self._streams = max(nw, 1)
            self._next_stream = (stream + 1) % self._streams
            if nw > 0:  # in the main process the counters were updated while iterating
                self.samples += 1
                self.skipped_images += bad_images
                self.skipped_texts += bad_texts

    def skip(self, n: int, batch_size: int | None = None) -> None:
        """Resume this epoch after the first n samples the loop consumed.

        Exact with num_workers=0. With DataLoader workers pass the loader's batch_size: the split
        over workers is then computed from the DataLoader's round-robin, which is exact until a
        worker runs out of data (near the end of an epoch with unequal shards); record() and
        state_dict() are exact everywhere.
        """
        self._clear_position()
        if n > 0:
            self._pending_skip = (int(n), batch_size)

    def state_dict(self) -> dict:
        return {"seed": self.seed, "epoch": self.epoch, "rank": self.rank, "world_size": self.world_size,
                "streams": self._streams, "next_stream": self._next_stream,
                "consumed": {str(k): n for k, n in sorted(self._consumed.items())},
                "samples": self.samples, "skipped_images": self.skipped_images,
                "skipped_texts": self.skipped_texts, "bad_shards": self.bad_shards}

    def load_state_dict(self, state: dict) -> None:
        for k in ("seed", "rank", "world_size"):
            if state[k] != getattr(self, k):
                raise ValueError(f"cannot resume: the state has {k}={state[k]}, this dataset {getattr(self, k)}")
        self.epoch = int(state["epoch"])
        self._clear_position()
        self._consumed = {int(k): int(n) for k, n in state["consumed"].items()}
        self._resume = dict(self._consumed)
        self._streams = self._resume_streams = int(state["streams"])
        self._next_stream = self._rotation = int(state["next_stream"])
        for k in ("samples", "skipped_images", "skipped_texts", "bad_shards"):
            setattr(self, k, int(state[k]))

    def stats(self) -> dict:
        return {"samples": self.samples, "skipped_images": self.skipped_images,
                "skipped_texts": self.skipped_texts, "bad_shards": self.bad_shards,
                "shards": len(self.rank_shards())}
