"""An image collection searchable by text or by image: ITC embeddings in a faiss index.

    index = build_index(model, "photos/", "photos.index")      # again later: only new/changed files embed
    index = ImageIndex.open("photos.index")
    index.search(model, "a dog on a beach", k=10, rerank=True)  # [{"path", "score", "itm"}, ...]

A folder on disk holds the index:
  index.json      the model fingerprint and checkpoint, the embedding width, the faiss index kind
  items.jsonl     one row per vector, in vector order: {"id", "path", "mtime_ns", "size"}
  embeddings.npy  the L2-normalised ITC image embeddings (rows, dim) float32: the index is rebuilt from
                  them on an update, so removing files never needs faiss's per-kind removal
  vectors.faiss   the faiss index over them: exact inner product (IndexFlatIP) up to APPROX_MIN rows,
                  HNSW past it (see docs/grounding_and_search.md and benchmarks/index_recall.py)

Scores are cosines, comparable only between embeddings of one model: the index records a fingerprint
of the model (a hash of its projection weights and architecture) and refuses another model.
"""
from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path

import numpy as np
import torch

__all__ = ["build_index", "ImageIndex", "IndexModelError", "fingerprint", "APPROX_MIN"]

VERSION = 1
APPROX_MIN = 100_000  # rows from which an HNSW index replaces exact search (benchmarks/index_recall.py)
HNSW_M, HNSW_EF_CONSTRUCTION, HNSW_EF_SEARCH = 32, 80, 128


class IndexModelError(ValueError):
    """The model given is not the one the index was built with."""


def fingerprint(model) -> str:
    """A hash of what decides the ITC embedding space: the projection weights (rounded to bf16, so the
    same checkpoint in fp32 or bf16 agrees) and the architecture (the task aside)."""
    model._require("project", model.has("vision_proj", "text_proj"))
    h = hashlib.sha256()
    cfg = {k: v for k, v in model.config.to_dict().items() if k != "task"}
    h.update(json.dumps(cfg, sort_keys=True, default=str).encode())
    for layer in (model.vision_proj, model.text_proj):
        for t in (layer.weight, layer.bias):
            h.update(t.detach().to("cpu", torch.bfloat16).view(torch.int16).numpy().tobytes())
    return h.hexdigest()[:20]


def _faiss():
    try:
        import faiss
    except ImportError:
        raise ImportError("image search needs faiss: pip install faiss-cpu") from None
    return faiss


def _vector_index(vectors: np.ndarray, approx_min: int):
    """Exact inner product for small collections, HNSW (inner product) for large ones."""
    faiss = _faiss()
    n, dim = vectors.shape
    if n >= approx_min:
        index = faiss.IndexHNSWFlat(dim, HNSW_M, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = HNSW_EF_CONSTRUCTION
        index.hnsw.efSearch = HNSW_EF_SEARCH
    else:
        index = faiss.IndexFlatIP(dim)
    if n:
        index.add(np.ascontiguousarray(vectors, dtype=np.float32))
    return index


def _collect(images) -> list[str]:
    """Absolute paths: files as given, folders walked for image files (sorted)."""
    from ..cli import IMAGE_EXTS
    items = [images] if isinstance(images, (str, os.PathLike)) else list(images)
    out = []
    for item in items:
        p = Path(item)
        if p.is_dir():
            out += sorted(str(f.resolve()) for f in p.rglob("*") if f.is_file() and f.suffix.lower() in IMAGE_EXTS)
        elif p.is_file():
            out.append(str(p.resolve()))
        else:
            raise OSError(f"image or folder not found: {item}")
    return list(dict.fromkeys(out))


def _stat(path: str) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_mtime_ns, st.st_size


def _write(path: Path, write) -> None:
    """Write through a temporary file and rename, so a crash leaves the old file whole."""
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    os.replace(tmp, path)


class ImageIndex:
    """An opened index folder. `paths[i]` is the image of vector i."""

    def __init__(self, root: Path, info: dict, items: list[dict], vectors: np.ndarray, index):
        self.root, self.info, self.items, self.vectors, self.index = root, info, items, vectors, index
        self.last_update: dict = {}

    # ----------------------------------------------------------------- files
    @classmethod
    def open(cls, out_dir) -> "ImageIndex":
        root = Path(out_dir)
        info_path = root / "index.json"
        if not info_path.is_file():
            raise OSError(f"no image index in {root} (index.json missing): build one with `blip index`")
        try:
            info = json.loads(info_path.read_text())
            items = [json.loads(line) for line in (root / "items.jsonl").read_text().splitlines() if line]
            vectors = np.load(root / "embeddings.npy")
        except (OSError, ValueError) as e:
            raise OSError(f"damaged image index in {root}: {e}") from None
        if info.get("version") != VERSION:
            raise OSError(f"{info_path}: index version {info.get('version')!r}, this blip reads {VERSION}")
        if vectors.shape != (len(items), info["dim"]):
            raise OSError(f"damaged image index in {root}: {vectors.shape[0]} vectors for {len(items)} items")
        faiss_path = root / "vectors.faiss"
        index = _faiss().read_index(str(faiss_path)) if faiss_path.is_file() else None
        if index is None or index.ntotal != len(items):
            index = _vector_index(vectors, info.get("approx_min", APPROX_MIN))
        if hasattr(index, "hnsw"):
            index.hnsw.efSearch = HNSW_EF_SEARCH
        return cls(root, info, items, vectors, index)

    def save(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        faiss = _faiss()
        def save_vectors(p):
            with open(p, "wb") as f:  # a file object: np.save would append ".npy" to the temporary name
                np.save(f, self.vectors)
        _write(self.root / "embeddings.npy", save_vectors)
        _write(self.root / "vectors.faiss", lambda p: faiss.write_index(self.index, str(p)))
        _write(self.root / "items.jsonl", lambda p: p.write_text("".join(json.dumps(r) + "\n" for r in self.items)))
        _write(self.root / "index.json", lambda p: p.write_text(json.dumps(self.info, indent=2)))

    # ----------------------------------------------------------------- queries
    def __len__(self) -> int:
        return len(self.items)

    @property
    def paths(self) -> list[str]:
        return [r["path"] for r in self.items]

    @property
    def kind(self) -> str:
        return "hnsw" if hasattr(self.index, "hnsw") else "flat"

    def check_model(self, model) -> None:
        fp = fingerprint(model)
        if fp != self.info["fingerprint"]:
            raise IndexModelError(f"the index in {self.root} was built with another model "
                                  f"({self.info.get('model') or 'unnamed'}, fingerprint {self.info['fingerprint']}; "
                                  f"this one is {fp}): search with that model, or rebuild the index")

    def search(self, model, query, k: int = 10, rerank: bool = False, rerank_depth: int | None = None) -> list[dict]:
        """The k images nearest to `query`: a text (str) or an image (a path-like, PIL image, bytes).

        Returns [{"path", "score"}] (score: ITC cosine), best first. rerank (text queries): the top
        rerank_depth (default 2k) are re-scored by the ITM head and sorted by it, each with "itm"
        (P(match); None for an image no longer readable, placed last)."""
        self.check_model(model)
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        text = isinstance(query, str)
        if rerank and not text:
            raise ValueError("rerank needs a text query (the ITM head scores image-text pairs)")
        if not len(self):
            return []
        q = model.embed_texts([query]) if text else model.embed_images([query])
        q = q.float().cpu().numpy()
        depth = min(len(self), max(k, rerank_depth or 2 * k) if rerank else k)
        if hasattr(self.index, "hnsw"):
            self.index.hnsw.efSearch = max(HNSW_EF_SEARCH, depth)
        scores, rows = self.index.search(q, depth)
        hits = [{"path": self.items[r]["path"], "score": float(s)} for s, r in zip(scores[0], rows[0]) if r >= 0]
        if rerank:
            hits = self._rerank(model, query, hits)
        return hits[:k]

    def _rerank(self, model, text: str, hits: list[dict]) -> list[dict]:
        from ..transform import ImageError, load_image
        readable, images = [], []
        for h in hits:
            try:
                images.append(load_image(h["path"]))
                readable.append(h)
            except ImageError:
                h["itm"] = None
        for start in range(0, len(images), 32):
            chunk = images[start:start + 32]
            itm = model.match(chunk, [text] * len(chunk))["itm"].float().cpu().tolist()
            for h, p in zip(readable[start:start + 32], itm):
                h["itm"] = p
        return sorted(hits, key=lambda h: -1.0 if h["itm"] is None else h["itm"], reverse=True)

    # ----------------------------------------------------------------- updates
    def update(self, model, images, batch_size: int = 32, progress: bool = True, workers: int | None = None) -> dict:
        """Add new images, re-embed changed ones (mtime or size), drop indexed files gone from disk.
        Files indexed before and not among `images` stay. Unreadable images are skipped (and tried again
        next time). Returns the counts {"added", "updated", "removed", "kept", "skipped"}."""
        from ..transform import ImageError, iter_images
        self.check_model(model)
        wanted = _collect(images)
        old = {r["path"]: (i, r) for i, r in enumerate(self.items)}
        keep_rows, stats, counts = [], {}, dict(added=0, updated=0, removed=0, kept=0, skipped=0)
        for path, (i, r) in old.items():
            st = _stat(path)
            if st is None:
                counts["removed"] += 1
            elif st == (r["mtime_ns"], r["size"]):
                keep_rows.append(i)
            else:
                stats[path] = st
        changed = set(stats)
        stats.update((p, _stat(p)) for p in wanted if p not in old)  # stat before reading: a later edit shows next time
        todo = list(stats)
        counts["kept"] = len(keep_rows)
        items = [self.items[i] for i in keep_rows]
        parts = [self.vectors[keep_rows]]
        bar = None
        if progress and todo:
            from tqdm import tqdm
            bar = tqdm(total=len(todo), unit="img", desc="embedding", file=sys.stderr, leave=False)
        batch, batch_paths = [], []

        def flush():
            if batch:
                emb = model.embed_images(torch.stack(batch)).float().cpu().numpy()
                parts.append(emb)
                for p in batch_paths:
                    mtime, size = stats[p] or (0, 0)
                    items.append({"path": p, "mtime_ns": mtime, "size": size})
                    counts["updated" if p in changed else "added"] += 1
                batch.clear()
                batch_paths.clear()

        for i, x in iter_images(todo, model.config.vision.image_size, workers=workers, ahead=2 * batch_size):
            if bar is not None:
                bar.update(1)
            if isinstance(x, ImageError):
                counts["skipped"] += 1
                print(f"blip: warning: skipped {todo[i]}: {x}", file=sys.stderr)
                continue
            batch.append(x)
            batch_paths.append(todo[i])
            if len(batch) == batch_size:
                flush()
        flush()
        if bar is not None:
            bar.close()
        next_id = self.info.get("next_id", 0)
        for r in items:
            if "id" not in r:
                r["id"], next_id = next_id, next_id + 1
        approx_min = self.info.get("approx_min", APPROX_MIN)
        appended = keep_rows == list(range(len(self.items))) and (len(items) >= approx_min) == (self.kind == "hnsw")
        self.items = items
        self.vectors = np.concatenate(parts).astype(np.float32, copy=False).reshape(len(items), self.info["dim"])
        if appended and self.index.ntotal == len(keep_rows):  # nothing removed: add to the index as it is
            if len(items) > len(keep_rows):
                self.index.add(np.ascontiguousarray(self.vectors[len(keep_rows):]))
        else:  # rebuilt: an HNSW graph cannot drop nodes
            self.index = _vector_index(self.vectors, approx_min)
        self.info.update(count=len(items), next_id=next_id, kind=self.kind)
        self.save()
        self.last_update = counts
        return counts


def build_index(model, images, out_dir, batch_size: int = 32, progress: bool = True, *, source: str | None = None,
                rebuild: bool = False, workers: int | None = None, approx_min: int = APPROX_MIN) -> ImageIndex:
    """Embed `images` (paths and/or folders, or one folder) into the index at out_dir, or update the
    index already there (see ImageIndex.update): new and changed files are embedded, vanished ones dropped.
    source: the checkpoint to record as the index's model (default: where `blip.load` read the model)."""
    model._require("project", model.has("vision_proj", "text_proj"))
    root = Path(out_dir)
    if root.exists() and not root.is_dir():
        raise OSError(f"index folder {root} is a file")
    if (root / "index.json").is_file() and not rebuild:
        index = ImageIndex.open(root)
    else:
        if root.is_dir() and any(root.iterdir()) and not (root / "index.json").is_file():
            raise OSError(f"{root} is not empty and holds no image index: give a new or empty folder")
        dim = model.config.embed_dim
        source = source or getattr(model, "source", None)
        if source and Path(source).exists():
            source = str(Path(source).resolve())  # `blip search` loads it from anywhere
        info = {"version": VERSION, "model": source, "fingerprint": fingerprint(model),
                "dim": dim, "count": 0, "next_id": 0, "approx_min": approx_min, "kind": "flat"}
        empty = np.zeros((0, dim), np.float32)
        index = ImageIndex(root, info, [], empty, _vector_index(empty, approx_min))
    index.update(model, images, batch_size=batch_size, progress=progress, workers=workers)
    return index
