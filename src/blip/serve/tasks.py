"""What the model thread runs: each function takes a list of request payloads and returns one
JSON-ready result per payload. Batched ones (caption, match, embed) run the whole list as one
model call; the others are handed lists of one.
"""
from __future__ import annotations

import base64
import io

import torch

from blip.tokenizer import ENC_ID


def caption(model, options: dict, seed: int | None, images: list[torch.Tensor]) -> list[dict]:
    """images: normalised (3, s, s) tensors; options: model.caption's keyword arguments."""
    kw = dict(options)
    if seed is not None:  # a seeded request runs alone (its own generator)
        kw["generator"] = torch.Generator(device=model.device).manual_seed(seed)
    x = torch.stack(images)
    return model.caption(x, batch_size=len(images), return_ids=True, workers=0, **kw)


def match(model, first_token: str, payloads: list[tuple[torch.Tensor, list[str]]]) -> list[dict]:
    """ITM probability and ITC cosine of each request's texts against its image. The images go through
    the ViT once each, the texts of all requests in one encoder call; `model.match` per request
    computes the same (the tests check)."""
    states = model.encode_image(torch.stack([x for x, _ in payloads]))
    texts = [t for _, ts in payloads for t in ts]
    owner = torch.tensor([i for i, (_, ts) in enumerate(payloads) for _ in ts], device=model.device)
    ids, mask = model._texts(texts, 35, None)
    itc = model.itc_similarity(states, ids, mask)[owner, torch.arange(len(texts), device=model.device)]
    if first_token == "enc":
        ids[:, 0] = ENC_ID
    itm = model.itm_logits(states[owner], ids, mask).float().softmax(-1)[:, 1]
    out, start = [], 0
    for _, ts in payloads:
        end = start + len(ts)
        out.append({"texts": ts, "itm": itm[start:end].tolist(), "itc": itc[start:end].tolist()})
        start = end
    return out


def embed(model, payloads: list[tuple[torch.Tensor | None, list[str] | None]]) -> list[dict]:
    """Image and text embeddings (L2-normalised ITC ones when the model has projection heads)."""
    xs = [x for x, _ in payloads if x is not None]
    texts = [t for _, ts in payloads for t in (ts or [])]
    img = model.embed_images(torch.stack(xs)).float().cpu() if xs else None
    txt = model.embed_texts(texts).float().cpu() if texts else None
    out, i, j = [], 0, 0
    for x, ts in payloads:
        rec = {}
        if x is not None:
            rec["image"] = img[i].tolist()
            i += 1
        if ts:
            rec["texts"] = ts
            rec["text"] = txt[j:j + len(ts)].tolist()
            j += len(ts)
        out.append(rec)
    return out


def classify(model, payloads: list[tuple[torch.Tensor, list[str], str, int]]) -> list[dict]:
    """Zero-shot: ITC cosine of the image against every prompted label, then the ITM head reranks
    the `rerank` best (as retrieval does: ITC to shortlist, ITM to decide)."""
    (x, labels, template, rerank), = payloads
    prompts = [template.format(label) for label in labels]
    itc = (model.embed_images(x[None]) @ model.embed_texts(prompts).t())[0].float().cpu()
    order = itc.argsort(descending=True).tolist()
    top = order[:rerank]
    itm = model.match(x[None], [prompts[i] for i in top])["itm"].float().cpu().tolist() if top else []
    ranked = sorted(zip(top, itm), key=lambda p: -p[1]) + [(i, None) for i in order[rerank:]]
    rows = [{"label": labels[i], "prompt": prompts[i], "itc": float(itc[i]), "itm": p} for i, p in ranked]
    return [{"label": rows[0]["label"], "ranking": rows}]


def vqa(model, payloads: list[tuple[torch.Tensor, list[str], list[str] | None]]) -> list[dict]:
    (x, questions, answers), = payloads
    got = model.answer(x[None], questions, answer_list=answers)
    return [{"questions": questions, "answers": got, "ranked": answers is not None}]


def ground(model, payloads: list) -> list[dict]:
    """The grounding heat maps of the ITM score over the patch grid (`blip.grounding.gradcam`; runs outside
    inference mode: it needs gradients)."""
    from blip import grounding
    (image, text, method), = payloads
    g = grounding.gradcam(model, image, text, method=method)
    word_maps, text_map = g["word_maps"].float().cpu(), g["text_map"].float().cpu()
    small = _fit(image, 384)
    return [{
        "text": text, "words": list(g["words"]), "tokens": list(g["tokens"]), "itm": float(g["itm"]),
        "grid": list(g["grid"]), "method": g["method"], "text_map": text_map.tolist(), "word_maps": word_maps.tolist(),
        "overlay": _b64(grounding.overlay(small, text_map), "PNG"),
        "word_overlays": [_b64(grounding.overlay(small, m), "PNG") for m in word_maps],
    }]


def search(model, index, payloads: list) -> list[list[dict]]:
    (query, k, rerank), = payloads
    return [index.search(model, query, k=k, rerank=rerank)]


# ----------------------------------------------------------------- images for the answers
def _fit(image, side: int):
    image = image.copy()
    image.thumbnail((side, side))
    return image


def _b64(image, fmt: str) -> str:
    buf = io.BytesIO()
    image.convert("RGB").save(buf, fmt, **({"quality": 85} if fmt == "JPEG" else {}))
    return base64.b64encode(buf.getvalue()).decode("ascii")


def thumbnail(path: str, side: int = 160) -> str | None:
    """A base64 JPEG of an indexed image, or None when the file is gone or unreadable."""
    from blip.transform import ImageError, load_image
    try:
        return _b64(_fit(load_image(path), side), "JPEG")
    except (ImageError, OSError):
        return None
