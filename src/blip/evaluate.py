"""Evaluation protocols: image-text retrieval as the official `train_retrieval.evaluation` does it.

ITC cosine ranks every text for every image (no temperature); optionally the top `k_test`
candidates are re-scored with the ITM head (raw logit + cosine, as the official code; everything
else -100). Recall@K for text->image (IR) and image->text (TR, best rank among an image's captions).
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from tqdm import tqdm

from .tokenizer import ENC_ID
from .transform import image_batches


def load_retrieval_annotation(path: str | Path, image_root: str | Path | None = None):
    """Official test format `[{"image": path, "caption": [refs]}]` -> (image paths, texts, txt2img, img2txt)."""
    path = Path(path)
    data = json.loads(path.read_text())
    root = Path(image_root) if image_root else path.parent
    images, texts, txt2img, img2txt = [], [], [], []
    for i, entry in enumerate(data):
        images.append(str(root / entry["image"]))
        caps = entry["caption"] if isinstance(entry["caption"], list) else [entry["caption"]]
        img2txt.append([])
        for cap in caps:
            img2txt[i].append(len(texts))
            txt2img.append(i)
            texts.append(cap)
    return images, texts, txt2img, img2txt


@torch.inference_mode()
def retrieval_scores(model, images, texts, batch_size: int = 32, k_test: int = 0, progress: bool = False):
    """(image x text) score matrix: ITC cosine, or ITM logit + cosine for each image's top-k_test texts
    and each text's top-k_test images (two matrices then: i2t and t2i, as the official code)."""
    image_states, image_feats = [], []
    batches = image_batches(images, model.config.vision.image_size, batch_size)  # decoded ahead, in threads
    for batch in tqdm(batches, total=-(-len(images) // batch_size), disable=not progress, desc="images"):
        states = model.encode_image(batch)
        image_feats.append(torch.nn.functional.normalize(model.vision_proj(states[:, 0]).float(), dim=-1))
        if k_test:
            image_states.append(states.cpu())
    text_feats, text_ids, text_masks = [], [], []
    for start in range(0, len(texts), batch_size):
        ids, mask = model._texts(texts[start:start + batch_size], 35, None)
        cls = model.text_encoder(ids, mask, mode="text")[:, 0]
        text_feats.append(torch.nn.functional.normalize(model.text_proj(cls).float(), dim=-1))
        if k_test:
            text_ids += list(ids.cpu())
            text_masks += list(mask.cpu())
    sims = torch.cat(image_feats) @ torch.cat(text_feats).t()
    if not k_test:
        return sims, sims.t()
    states = torch.cat(image_states)
    # each image's top-k texts (i2t) and each text's top-k images (t2i) as masks; a pair in both is scored once
    in_i2t = torch.zeros_like(sims, dtype=torch.bool)
    in_i2t.scatter_(1, sims.topk(min(k_test, sims.shape[1]), dim=1).indices, True)
    in_t2i = torch.zeros_like(sims, dtype=torch.bool)
    in_t2i.scatter_(0, sims.topk(min(k_test, sims.shape[0]), dim=0).indices, True)
    itm = torch.zeros_like(sims)
    wanted = in_i2t | in_t2i
    for img in tqdm(range(sims.shape[0]), disable=not progress, desc="itm rerank"):
        txt = wanted[img].nonzero()[:, 0].tolist()
        for start in range(0, len(txt), batch_size):  # one image's K/V serve all its texts
            chunk = txt[start:start + batch_size]
            ids = torch.nn.utils.rnn.pad_sequence([text_ids[t] for t in chunk], batch_first=True).to(model.device)
            mask = torch.nn.utils.rnn.pad_sequence([text_masks[t] for t in chunk], batch_first=True).to(model.device)
            ids[:, 0] = ENC_ID
            itm[img, chunk] = model.itm_logits(states[img:img + 1].to(model.device), ids, mask)[:, 1].float().cpu()
    i2t = torch.where(in_i2t, itm + sims, torch.tensor(-100.0))
    t2i = torch.where(in_t2i, itm + sims, torch.tensor(-100.0)).t().contiguous()
    return i2t, t2i


def recall_at_k(i2t: torch.Tensor, t2i: torch.Tensor, txt2img: list[int], img2txt: list[list[int]]) -> dict:
    """TR@1/5/10 (an image's best-ranked caption), IR@1/5/10, and their mean, in percent."""
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
    out["chance_ir@1"] = 100.0 / i2t.shape[0]
    return out


def evaluate_retrieval(model, annotation: str | Path, image_root=None, k_test: int = 0, progress: bool = False) -> dict:
    images, texts, txt2img, img2txt = load_retrieval_annotation(annotation, image_root)
    i2t, t2i = retrieval_scores(model, images, texts, k_test=k_test, progress=progress)
    return recall_at_k(i2t, t2i, txt2img, img2txt)
