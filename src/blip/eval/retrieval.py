"""Image-text retrieval as the official `train_retrieval.evaluation`: TR/IR@1/5/10 and r_mean.

1. ITC: every text's and every image's normalised projected [CLS] feature; sims = cosine (no temp).
2. ITM rerank: each image's top-k_test texts (i2t) and each text's top-k_test images (t2i) are scored
   with the raw ITM logit of the [ENC] state + their cosine; everything else is -100.
3. TR@K takes the best rank among an image's captions, IR@K the rank of a text's image.

Cost: one ViT pass per image, one text pass per text, one multimodal pass per wanted pair (a pair in both
top-k sets is scored once). The pairs are grouped by image, so an image's cross-attention keys/values
are computed once for all its texts (several images share a pass when they have few).

Memory: the ViT states of every image are needed after all images are seen (a text's top-k images are
known only then). They are kept in the ViT's dtype in RAM up to `max_state_bytes`, else in a temporary
file-backed tensor (the page cache holds what fits; read back one block of images at a time), so a
COCO-size test set (5k images, 8.9 GB of fp32 states at base 384 px) neither fills memory nor pays a
second ViT pass. See docs/finetuning.md "Retrieval".

With `distributed=True` (every rank of an initialised process group calls it) images and texts are
split over the ranks for the encoders, features are gathered, and each rank scores the pairs of its
images; the ITM logits are summed over ranks (all_reduce SUM, as the official code sums its score
matrices).
"""
from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from ..data.annotation import read_json_list
from ..med import KVCache
from ..tokenizer import ENC_ID, get_tokenizer, pre_caption
from ..transform import image_batches

RULE = "highest r_mean (mean of TR/IR@1/5/10), as the official train_retrieval.py"
MAX_LENGTH = 35  # official retrieval text length
MAX_WORDS = 30   # official pre_caption of the eval texts
__all__ = ["RULE", "evaluate", "load_retrieval_annotation", "recall_at_k", "retrieval_scores", "score",
           "evaluate_retrieval"]


# ------------------------------------------------------------------------------ data
def load_retrieval_annotation(path: str | Path, image_root: str | Path | None = None):
    """Official test format `[{"image": path, "caption": [refs] or str}]` -> (image paths, texts,
    txt2img, img2txt). ValueError / OSError (one line, naming the file) for anything else."""
    path = Path(path)
    data = read_json_list(path, "annotation", '{"image", "caption"} entries')
    root = Path(image_root) if image_root else path.parent
    images, texts, txt2img, img2txt = [], [], [], []
    for i, entry in enumerate(data):
        caps = entry.get("caption") if isinstance(entry, dict) else None
        caps = [caps] if isinstance(caps, str) else caps
        if not isinstance(entry, dict) or not isinstance(entry.get("image"), str) or not caps \
                or not all(isinstance(c, str) for c in caps):
            raise ValueError(f"{path}: entry {i} is not {{\"image\": path, \"caption\": [texts]}} (retrieval test "
                             f"format, e.g. coco_karpathy_test.json; a VQA file has questions)")
        images.append(str(root / entry["image"]))
        img2txt.append(list(range(len(texts), len(texts) + len(caps))))
        txt2img += [i] * len(caps)
        texts += caps
    return images, texts, txt2img, img2txt


class StateStore:
    """(N, S, D) image states written in order, read back in blocks: a RAM tensor up to max_bytes, else
    a temporary file mapped as a tensor (removed by close())."""

    def __init__(self, n: int, max_bytes: int, folder: str | Path | None = None):
        self.n, self.max_bytes, self.folder = n, max_bytes, folder
        self.data: torch.Tensor | None = None
        self.file: str | None = None
        self.filled = 0

    def write(self, x: torch.Tensor) -> None:
        if self.data is None:
            shape, dtype = (self.n, *x.shape[1:]), x.dtype
            numel = math.prod(shape)
            if numel * x.element_size() <= self.max_bytes:
                self.data = torch.empty(shape, dtype=dtype)
            else:
                fd, self.file = tempfile.mkstemp(prefix="blip-states-", suffix=".bin", dir=self.folder)
                os.close(fd)
                self.data = torch.from_file(self.file, shared=True, size=numel, dtype=dtype).view(shape)
        self.data[self.filled:self.filled + len(x)] = x.cpu()
        self.filled += len(x)

    def read(self, start: int, end: int) -> torch.Tensor:
        return self.data[start:end]

    @property
    def on_disk(self) -> bool:
        return self.file is not None

    def close(self) -> None:
        self.data = None
        if self.file is not None:
            Path(self.file).unlink(missing_ok=True)
            self.file = None


# ------------------------------------------------------------------------------ distribution
def _split(n: int, rank: int, world: int) -> tuple[int, int]:
    per = -(-n // world)
    return min(n, rank * per), min(n, (rank + 1) * per)


def _gather_rows(x: torch.Tensor, n: int, world: int) -> torch.Tensor:
    """Concatenate every rank's contiguous slice (`_split`) of an n-row tensor."""
    if world == 1:
        return x
    from ..train import distributed as dist
    per = -(-n // world)
    padded = torch.cat([x, x.new_zeros(per - len(x), *x.shape[1:])])
    parts = dist.gather(padded).view(world, per, *x.shape[1:])
    return torch.cat([parts[r, :_split(n, r, world)[1] - _split(n, r, world)[0]] for r in range(world)])


# ------------------------------------------------------------------------------ scores
def _itm_passes(lengths: list[int], rows: int, chunk: int | None = None,
                tokens=None) -> list[list[tuple[int, int, int]]]:
    """Pack each image's texts into passes of at most `rows` rows: items (image, start, count) of at most
    `chunk` (default `rows`) texts; a pass holds items padded to its first (longest) item, as many as fit.
    With tokens(g, s, n) (the longest text of an item), items of a count are ordered by it, so a pass's
    texts have similar lengths (each pass is padded to its longest text)."""
    chunk = chunk or rows
    items = [(g, s, min(chunk, n - s)) for g, n in enumerate(lengths) for s in range(0, n, chunk)]
    items.sort(key=lambda it: (-it[2], tokens(*it) if tokens else 0))
    passes, i = [], 0
    while i < len(items):
        width = items[i][2]
        take = max(1, rows // width)
        passes.append(items[i:i + take])
        i += take
    return passes


def _itm_logits(model, states, text_ids, text_mask, text_lens, texts_of, rows):
    """ITM logits (match class) of image g with each text in texts_of[g]: one K/V per image for all passes."""
    enc = model.text_encoder
    kv = enc.cross_kv(states.to(device=model.device, dtype=model.text_dtype))
    out = [torch.empty(len(t)) for t in texts_of]
    # each image's texts are sorted by length (the caller's order too), cut in chunks of 64 rows, and
    # chunks of similar length share a pass: padding to a pass's longest text wasted ~1/3 of the work
    longest = lambda g, s, n: int(text_lens[texts_of[g][s + n - 1]])  # noqa: E731
    for items in _itm_passes([len(t) for t in texts_of], rows, min(rows, 64), longest):
        width = items[0][2]
        chosen = [texts_of[g][s:s + n] for g, s, n in items]
        chosen = torch.stack([torch.cat([c, c[-1:].expand(width - len(c))]) for c in chosen])  # pad with repeats
        chosen = chosen.flatten()
        t = int(text_lens[chosen].max())
        ids, mask = text_ids[chosen, :t].to(model.device), text_mask[chosen, :t]
        groups = [g for g, _, _ in items]
        if len(groups) == 1:
            pass_kv = [(k[groups[0]:groups[0] + 1], v[groups[0]:groups[0] + 1]) for k, v in kv]
        else:
            sel = torch.tensor(groups, device=model.device)
            pass_kv = [(k.index_select(0, sel), v.index_select(0, sel)) for k, v in kv]
        hidden = enc(ids, mask.to(model.device), mode="multimodal", cache=KVCache(pass_kv, None))[:, 0]
        logits = model.itm_head(hidden)[:, 1].float().cpu().view(len(items), width)
        for (g, s, n), row in zip(items, logits):
            out[g][s:s + n] = row[:n]
    return out


@torch.inference_mode()
def retrieval_scores(model, images, texts, *, k_test: int = 256, batch_size: int = 32, itm_rows: int = 256,
                     progress: bool = False, max_state_bytes: int = 2 << 30, state_dir=None,
                     kv_bytes: int = 512 << 20, distributed: bool = False):
    """(i2t (images, texts), t2i (texts, images)) score matrices on the CPU: the cosine when k_test is 0,
    else ITM logit + cosine on each image's top-k_test texts (i2t) and each text's top-k_test images (t2i),
    -100 elsewhere. images: paths / PIL images / bytes, or a normalised (N, 3, H, W) tensor.
    itm_rows: text rows per multimodal pass; max_state_bytes: ViT states kept in RAM beyond which they go
    to a temporary file in state_dir (default: the system's temporary folder); kv_bytes: cross-attention
    keys/values held at once (a block of images)."""
    from ..train import distributed as dist
    world = dist.world_size() if distributed else 1
    rank = dist.rank() if distributed else 0
    n_img, n_txt = len(images), len(texts)
    device = model.device

    # texts: one unimodal pass each (this rank's share), [CLS] first; ITM later puts [ENC] first
    tok = get_tokenizer()
    text_ids, text_mask = tok([pre_caption(t, MAX_WORDS) for t in texts], max_length=MAX_LENGTH, padding="max_length")
    text_lens = text_mask.sum(1)
    lo, hi = _split(n_txt, rank, world)
    feats = []
    for s in tqdm(range(lo, hi, 256), disable=not progress, desc="texts", leave=False):
        e = min(s + 256, hi)
        t = int(text_lens[s:e].max())
        cls = model.text_encoder(text_ids[s:e, :t].to(device), text_mask[s:e, :t].to(device), mode="text")[:, 0]
        feats.append(F.normalize(model.text_proj(cls).float(), dim=-1))
    empty = torch.zeros(0, model.text_proj.out_features, device=device)
    text_feats = _gather_rows(torch.cat(feats) if feats else empty, n_txt, world)
    text_ids[:, 0] = ENC_ID

    # images: one ViT pass each (this rank's share); states kept for the rerank
    i_lo, i_hi = _split(n_img, rank, world)
    store = StateStore(i_hi - i_lo, max_state_bytes, state_dir) if k_test else None
    feats = []
    try:
        if i_hi > i_lo:
            mine = images[i_lo:i_hi]
            batches = image_batches(mine, model.config.vision.image_size, batch_size)  # decoded ahead, in threads
            for batch in tqdm(batches, total=-(-len(mine) // batch_size), disable=not progress, desc="images",
                              leave=False):
                states = model.visual_encoder(model.pixels(batch))
                feats.append(F.normalize(model.vision_proj(states[:, 0].to(model.text_dtype)).float(), dim=-1))
                if store is not None:
                    store.write(states)
        image_feats = _gather_rows(torch.cat(feats) if feats else empty, n_img, world)
        sims = image_feats @ text_feats.T
        if not k_test:
            return sims.cpu(), sims.T.cpu()

        # the wanted pairs (the same on every rank: rank 0's top-k)
        top_i2t = sims.topk(min(k_test, n_txt), dim=1).indices
        top_t2i = sims.topk(min(k_test, n_img), dim=0).indices
        if world > 1:
            torch.distributed.broadcast(top_i2t, 0)
            torch.distributed.broadcast(top_t2i, 0)
        in_i2t = torch.zeros_like(sims, dtype=torch.bool).scatter_(1, top_i2t, True)
        in_t2i = torch.zeros_like(sims, dtype=torch.bool).scatter_(0, top_t2i, True)
        wanted = (in_i2t | in_t2i)[i_lo:i_hi].cpu()

        # this rank's images, a block at a time: each image's K/V once for all its texts, as many images
        # per block as kv_bytes allows (so images with few texts can share passes)
        itm = torch.zeros(n_img, n_txt)
        if i_hi > i_lo:
            text_cfg = model.text_encoder.cfg
            item = torch.finfo(model.text_dtype).bits // 8
            per_image = 2 * text_cfg.depth * store.data.shape[1] * text_cfg.width * item
            block_size = max(1, min(i_hi - i_lo, kv_bytes // per_image))
            for b in tqdm(range(0, i_hi - i_lo, block_size), disable=not progress, desc="itm rerank", leave=False):
                block = wanted[b:b + block_size]
                texts_of = [row.nonzero()[:, 0] for row in block]
                texts_of = [t[text_lens[t].argsort(stable=True)] for t in texts_of]  # by length
                logits = _itm_logits(model, store.read(b, b + len(block)), text_ids, text_mask, text_lens, texts_of,
                                     itm_rows)
                for g, (t, v) in enumerate(zip(texts_of, logits)):
                    itm[i_lo + b + g, t] = v
    finally:
        if store is not None:
            store.close()
    if world > 1:
        itm = itm.to(device)
        torch.distributed.all_reduce(itm)  # each pair was scored by one rank: the sum is its logit
    score = itm.to(device) + sims
    i2t = torch.where(in_i2t, score, torch.tensor(-100.0, device=device)).cpu()
    t2i = torch.where(in_t2i, score, torch.tensor(-100.0, device=device)).T.contiguous().cpu()
    return i2t, t2i


# ------------------------------------------------------------------------------ metrics
def recall_at_k(i2t: torch.Tensor, t2i: torch.Tensor, txt2img: list[int], img2txt: list[list[int]]) -> dict:
    """TR@1/5/10 (an image's best-ranked caption), IR@1/5/10, their means and r_mean, in percent."""
    ranks_tr = []
    for i, scores in enumerate(i2t):
        order = scores.argsort(descending=True)
        pos = torch.nonzero(torch.isin(order, torch.tensor(img2txt[i])))
        ranks_tr.append(int(pos.min()))
    ranks_ir = []
    for t, scores in enumerate(t2i):
        order = scores.argsort(descending=True)
        ranks_ir.append(int(torch.nonzero(order == txt2img[t]).min()))
    tr, ir = torch.tensor(ranks_tr), torch.tensor(ranks_ir)
    out = {}
    for k in (1, 5, 10):
        out[f"tr@{k}"] = 100.0 * float((tr < k).float().mean())
        out[f"ir@{k}"] = 100.0 * float((ir < k).float().mean())
    out["r_mean"] = sum(out.values()) / 6
    out["tr_mean"] = (out["tr@1"] + out["tr@5"] + out["tr@10"]) / 3
    out["ir_mean"] = (out["ir@1"] + out["ir@5"] + out["ir@10"]) / 3
    out["chance_ir@1"] = 100.0 / i2t.shape[0]
    return out


def evaluate(model, data, image_root=None, *, out_dir=None, progress: bool = False, k_test: int = 256,
             batch_size: int = 32, **options) -> dict:
    """Metrics on an official test file (`[{"image", "caption": [refs]}]`); options go to
    retrieval_scores (itm_rows, max_state_bytes, state_dir, kv_bytes, distributed). With out_dir, also writes
    metrics.json there (rank 0)."""
    images, texts, txt2img, img2txt = load_retrieval_annotation(data, image_root)
    training = model.training
    model.eval()
    try:
        i2t, t2i = retrieval_scores(model, images, texts, k_test=k_test, batch_size=batch_size, progress=progress,
                                    **options)
    finally:
        model.train(training)
    metrics = recall_at_k(i2t, t2i, txt2img, img2txt)
    if out_dir is not None and (not options.get("distributed") or torch.distributed.get_rank() == 0):
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        (Path(out_dir) / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    return metrics


def score(metrics: dict) -> float:
    return metrics["r_mean"]


def evaluate_retrieval(model, annotation, image_root=None, k_test: int = 0, progress: bool = False) -> dict:
    """The former blip.evaluate entry point (ITC only unless k_test)."""
    return evaluate(model, annotation, image_root, k_test=k_test, progress=progress)
