"""Data plumbing for the training loop: datasets from the config, a resumable rank-aware sampler,
per-sample seeding (so random augmentations replay exactly after a resume), and tokenising collate.
"""
from __future__ import annotations

import random
import re

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, IterableDataset

from ..tokenizer import get_tokenizer

_WORDS = ["red", "green", "blue", "yellow", "black", "white"]
_THINGS = ["square", "circle", "stripe", "dot", "cross", "ring", "block", "bar"]


class RandomPairs(Dataset):
    """n deterministic (image, caption) pairs: each of a few caption classes has its own image
    pattern plus per-item noise, so image and text agree and losses can fall."""

    def __init__(self, n: int, image_size: int, classes: int = 8, seed: int = 0):
        self.n, self.image_size, self.classes, self.seed = n, image_size, classes, seed
        g = torch.Generator().manual_seed(seed)
        self.patterns = torch.randn(classes, 3, 4, 4, generator=g)

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict:
        c = i % self.classes
        g = torch.Generator().manual_seed(self.seed * 100003 + i)
        image = torch.nn.functional.interpolate(self.patterns[c:c + 1], size=self.image_size, mode="nearest")[0]
        image = image + 0.3 * torch.randn(image.shape, generator=g)
        text = f"a {_WORDS[c % len(_WORDS)]} {_THINGS[c % len(_THINGS)]} number {c}"
        return {"image": image, "text": text, "index": i}


class WordSwap:
    """A caption with one word or phrase of a group replaced by another alternative of that group ("a red
    circle to the left of a star" -> "a red circle to the right of a star"), or None when it has none. Used as
    extra ITM negatives: in-batch hard negatives almost never differ from the true caption in one attribute,
    and telling those apart is what matching has to learn.

    A group lists mutually exclusive alternatives; an alternative is a word, a phrase ("on the left"), or a
    list of synonyms (["below", "under", "beneath"]), so that no swap says the same thing (a false negative)
    or makes a phrase the captions never use ("on the top"), which ITM could tell from the text alone.
    Whole words, case-insensitive, the longest phrase first; the rest of the text is kept.

    pick: "word" (any match alike), "group" (a group the caption names first, alike, then a match of it),
    "rare" (a group first, weighted by 1 / the share of training texts that name it: see fit)."""

    def __init__(self, groups, pick: str = "word"):
        if pick not in ("word", "group", "rare"):
            raise ValueError('itm_swap_pick must be "word", "group" or "rare"')
        self.pick = pick
        self.groups = [[[str(w).lower() for w in ([a] if isinstance(a, str) else a)] for a in g] for g in groups]
        if any(len(g) < 2 or any(not a for a in g) for g in self.groups):
            raise ValueError("every itm_swap_words group needs at least two alternatives")
        self.where = {w: (gi, ai) for gi, g in enumerate(self.groups) for ai, a in enumerate(g) for w in a}
        if len(self.where) != sum(len(a) for g in self.groups for a in g):
            raise ValueError("a word or phrase appears twice in itm_swap_words")
        phrases = sorted(self.where, key=len, reverse=True)
        self.pattern = re.compile(r"\b(" + "|".join(re.escape(w).replace(r"\ ", r"\s+") for w in phrases)
                                  + r")\b", re.IGNORECASE)
        self.weight: dict = {}

    def _found(self, hit) -> tuple[int, int]:
        return self.where[" ".join(hit.group(0).lower().split())]

    def fit(self, texts) -> "WordSwap":
        """Group weights for pick="rare": 1 / the fraction of texts in which the group has a match."""
        counts: dict = {}
        texts = [t for x in texts for t in (x if isinstance(x, list) else [x]) if isinstance(t, str)]
        for t in texts:
            for g in {self._found(h)[0] for h in self.pattern.finditer(t)}:
                counts[g] = counts.get(g, 0) + 1
        self.weight = {g: len(texts) / c for g, c in counts.items()}
        return self

    @classmethod
    def build(cls, spec, pick: str = "word", texts=None) -> "WordSwap | None":
        if spec in (None, False, [], ""):
            return None
        if spec == "synthetic":
            from ..data.synth import SWAP_GROUPS
            spec = SWAP_GROUPS
        if isinstance(spec, str) or not all(isinstance(g, (list, tuple)) for g in spec):
            raise ValueError('itm_swap_words must be a list of groups (lists of words, phrases or synonym lists) '
                             'or "synthetic"')
        swap = cls(spec, pick)
        if pick == "rare":
            if texts is None:
                raise ValueError('itm_swap_pick "rare" needs the training texts (a JSON caption dataset)')
            swap.fit(texts)
        return swap

    def __call__(self, text: str, rng: random.Random) -> str | None:
        hits = [(h, self._found(h)) for h in self.pattern.finditer(text)]
        if not hits:
            return None
        if self.pick != "word":  # a caption names colours and shapes far more often than positions
            groups = sorted({gi for _, (gi, _) in hits})
            if self.pick == "group":
                group = groups[rng.randrange(len(groups))]
            else:
                group = rng.choices(groups, weights=[self.weight.get(g, 1.0) for g in groups])[0]
            hits = [x for x in hits if x[1][0] == group]
        hit, (gi, ai) = hits[rng.randrange(len(hits))]
        alt = rng.choice([a for k, a in enumerate(self.groups[gi]) if k != ai])
        other = alt[0] if len(alt) == 1 else rng.choice(alt)
        return text[:hit.start()] + other + text[hit.end():]


class SeededItems(Dataset):
    """Wraps a map-style dataset: item i of epoch e is made under RNG seeds derived from
    (seed, e, i) — whichever worker makes it, and whether or not the run was resumed — and a bad
    item (None) is replaced by the next good one so every batch stays full (the feature queue
    needs a fixed global batch)."""

    def __init__(self, dataset: Dataset, seed: int = 0, tries: int = 16, swap: WordSwap | None = None):
        self.dataset, self.seed, self.tries, self.epoch = dataset, seed, tries, 0
        self.swap = swap  # adds "neg_text" (None where the caption has no swappable word) under the item's seed

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        if hasattr(self.dataset, "set_epoch"):  # e.g. JsonCaptionDataset seeds its transform per epoch
            self.dataset.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int):
        n = len(self.dataset)
        for t in range(self.tries):
            j = (i + t) % n
            s = int(np.random.SeedSequence([self.seed, self.epoch, j]).generate_state(1)[0])
            # the CPU generator's state directly: torch.manual_seed and fork_rng cost ~0.2 ms an item
            gen = torch.random.default_generator
            py, npy, pt = random.getstate(), np.random.get_state(), gen.get_state()
            gen.manual_seed(s)
            random.seed(s)
            np.random.seed(s)
            try:
                item = self.dataset[j]
                if item is not None and self.swap is not None:
                    item = dict(item, neg_text=self.swap(item["text"], random))
            finally:
                random.setstate(py)
                np.random.set_state(npy)
                gen.set_state(pt)
            if item is not None:
                return item
        raise RuntimeError(f"{self.tries} consecutive bad items from index {i}")


class ResumableSampler(DistributedSampler):
    """DistributedSampler (one shard of a seeded per-epoch permutation per rank) that can start
    after the first `start` indices of its shard."""

    def __init__(self, dataset, num_replicas: int, rank: int, seed: int, shuffle: bool = True):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed, drop_last=True)
        self.start = 0

    def __iter__(self):
        return iter(list(super().__iter__())[self.start:])

    def __len__(self) -> int:
        return self.num_samples - self.start


def _bag_of_words(texts) -> np.ndarray:
    """(N, V) L2-normalised TF-IDF vectors (words lower-cased, split on non-letters) of each item's text or
    texts: words every caption uses ("a", "photo") count for little, what tells items apart for much."""
    docs = [" ".join(t) if isinstance(t, (list, tuple)) else (t or "") for t in texts]
    words = [re.findall(r"[a-z]+", d.lower()) for d in docs]
    vocab = {w: k for k, w in enumerate(sorted({w for ws in words for w in ws}))}
    m = np.zeros((len(docs), max(len(vocab), 1)), np.float32)
    for i, ws in enumerate(words):
        for w in ws:
            m[i, vocab[w]] += 1
    m *= np.log((1 + len(docs)) / (1 + (m > 0).sum(0))) + 1  # smoothed IDF
    return m / np.maximum(np.linalg.norm(m, axis=1, keepdims=True), 1e-12)


class SimilarTextSampler(ResumableSampler):
    """Batches made of groups of `group` items whose texts share the most words (TrainConfig.similar_groups).

    Why: in-batch contrastive negatives drawn at random differ from the positive in whatever is easiest to
    see (on the synthetic corpus: colour), so nothing asks the towers for the rest; within a group they
    differ in one or two words. Each epoch (seeded): walk a random permutation, each item not yet placed
    seeds a group with its `group - 1` nearest unplaced items (cosine of TF-IDF word vectors), the groups are
    shuffled and cut into batches, and rank r takes batches r, r + world, ... (drop_last, as the default).
    The vectors are dense (N x vocabulary) and the grouping costs O(N^2 / group) dot products an epoch:
    meant for caption files of up to tens of thousands of items, not for web-scale ones."""

    def __init__(self, dataset, texts, batch_size: int, group: int, num_replicas: int, rank: int, seed: int,
                 vectors: np.ndarray | None = None):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, seed=seed)
        if group < 2 or group > batch_size:
            raise ValueError(f"similar_groups must be in 2..batch_size ({batch_size}), got {group}")
        if len(texts) != len(dataset):
            raise ValueError(f"{len(texts)} texts for {len(dataset)} items")
        self.batch_size, self.group = batch_size, group
        self.vectors = _bag_of_words(texts) if vectors is None else vectors  # vectors: an earlier epoch's

    def _order(self) -> np.ndarray:
        n = len(self.vectors)
        rng = np.random.default_rng([self.seed, self.epoch])
        jitter = rng.random(n).astype(np.float32) * 1e-4  # ties between equally similar items: seeded, not by index
        free = np.ones(n, bool)
        groups = []
        for s in rng.permutation(n):
            if not free[s]:
                continue
            free[s] = False
            k = min(self.group - 1, int(free.sum()))
            if k:
                sims = self.vectors @ self.vectors[s] + jitter
                sims[~free] = -np.inf
                near = np.argpartition(-sims, k - 1)[:k]
                free[near] = False
                groups.append(np.concatenate([[s], near]))
            else:
                groups.append(np.array([s]))
        flat = np.concatenate([groups[i] for i in rng.permutation(len(groups))])
        per_step = self.batch_size * self.num_replicas
        batches = flat[:len(flat) // per_step * per_step].reshape(-1, self.batch_size)
        return batches[self.rank::self.num_replicas].ravel()

    def __iter__(self):
        return iter(self._order()[self.start:].tolist())

    def __len__(self) -> int:
        return len(self.vectors) // (self.batch_size * self.num_replicas) * self.batch_size - self.start


class Collate:
    """Stack images, tokenise texts ([CLS] first, cut at max_length; padded to the longest text, which
    gives the same losses as the official max_length padding for less compute), drop bad items.
    max_length None: the official pretraining truncation, 30 tokens."""

    def __init__(self, max_length: int | None = None, padding: str = "longest"):
        self.max_length, self.padding = max_length or 30, padding

    def __call__(self, items: list) -> dict:
        items = [it for it in items if it is not None]
        ids, mask = get_tokenizer()([it["text"] for it in items], max_length=self.max_length, padding=self.padding)
        batch = {"image": torch.stack([it["image"] for it in items]), "input_ids": ids, "attention_mask": mask,
                 "index": torch.tensor([int(it.get("index", -1)) for it in items])}
        if any("neg_text" in it for it in items):  # WordSwap negatives; rows without one are marked invalid
            neg = [it.get("neg_text") for it in items]
            batch["neg_input_ids"], batch["neg_attention_mask"] = get_tokenizer()(
                [t if t is not None else it["text"] for t, it in zip(neg, items)], max_length=self.max_length,
                padding=self.padding)
            batch["neg_valid"] = torch.tensor([t is not None for t in neg])
        return batch


def build_dataset(cfg, image_size: int, rank: int = 0, world: int = 1):
    """The training set named by the config: random pairs, JSON caption lists, or tar shards (blip.data)."""
    if cfg.synthetic_pairs:
        return RandomPairs(cfg.synthetic_pairs, image_size, seed=cfg.seed)
    from ..data import JsonCaptionDataset, ShardDataset
    from ..transform import TrainTransform
    transform = TrainTransform(image_size, min_scale=cfg.min_scale, randaugment=cfg.randaugment, hflip=cfg.hflip)
    if cfg.shards:
        return ShardDataset(cfg.shards, transform=transform, max_words=cfg.max_words, shuffle_buffer=cfg.shuffle_buffer,
                            seed=cfg.seed, rank=rank, world_size=world)
    if cfg.train_files:
        return JsonCaptionDataset(cfg.train_files, image_root=cfg.image_root, transform=transform,
                                  max_words=cfg.max_words, seed=cfg.seed)
    raise ValueError("no training data: set train_files, shards or synthetic_pairs")


def make_loader(dataset, cfg, rank: int, world: int, epoch: int, skip_batches: int = 0,
                collate_fn=None) -> DataLoader:
    """The loader of one epoch, positioned after `skip_batches` (per-rank micro-)batches.
    collate_fn: the task's (default: pretraining's tokenising Collate)."""
    g = torch.Generator().manual_seed(cfg.seed * 1000 + epoch)  # worker seeds: not the global RNG
    common = dict(batch_size=cfg.batch_size, num_workers=cfg.num_workers,
                  collate_fn=collate_fn or Collate(cfg.max_length, cfg.text_padding),
                  generator=g, drop_last=True, persistent_workers=False)
    if isinstance(dataset, IterableDataset):
        if hasattr(dataset, "set_epoch"):
            dataset.set_epoch(epoch)
        if hasattr(dataset, "skip"):  # ShardDataset: restart the stream after what was consumed
            dataset.skip(skip_batches * cfg.batch_size, batch_size=cfg.batch_size)
        elif skip_batches:
            raise RuntimeError(f"{type(dataset).__name__} cannot resume mid-epoch (no skip())")
        return DataLoader(dataset, **common)
    if not isinstance(dataset, SeededItems):
        raise TypeError("wrap map-style datasets in SeededItems")
    dataset.set_epoch(epoch)
    if cfg.similar_groups:
        texts = getattr(dataset.dataset, "captions", None)
        if texts is None:
            raise ValueError(f"similar_groups needs a dataset with captions (train_files), not "
                             f"{type(dataset.dataset).__name__}")
        sampler = SimilarTextSampler(dataset, texts, cfg.batch_size, cfg.similar_groups, world, rank, cfg.seed,
                                     vectors=getattr(dataset, "_text_vectors", None))
        dataset._text_vectors = sampler.vectors  # the texts do not change between epochs
    else:
        sampler = ResumableSampler(dataset, world, rank, seed=cfg.seed)
    sampler.set_epoch(epoch)
    sampler.start = skip_batches * cfg.batch_size
    return DataLoader(dataset, sampler=sampler, **common)


def batches_per_epoch(dataset, cfg, world: int) -> int | None:
    """Per-rank micro-batches in one epoch, when the data knows its length."""
    if isinstance(dataset, IterableDataset):
        try:
            return len(dataset) // cfg.batch_size
        except TypeError:
            return None
    return (len(dataset) // world) // cfg.batch_size
