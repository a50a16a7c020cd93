"""Grounding heat maps: which image patches make the ITM head say "match", per word of the text.

Two methods (`gradcam(..., method=)`):
- "gradcam": Grad-CAM over the cross-attention of one middle layer of the image-grounded text encoder, as
  LAVIS `compute_gradcam` (and the ALBEF visualisation notebook) do: the ITM match logit is differentiated
  with respect to that layer's cross-attention probabilities; attention * relu(gradient), averaged over
  heads, gives one map over the image patches per text token (the ViT's class token dropped). A word's
  map is the mean of its word pieces' maps, the text's map the mean over all its tokens.
- "saliency": gradient x input on the image tower's output patch tokens, relu of the sum over channels
  (Grad-CAM's product at the last layer that keeps the image's layout). The text's map differentiates the
  ITM logit; a word's map is what the text's map loses when the word is left out.
"auto" (the default) takes "saliency" for an image tower whose patch tokens all carry the pooled token
(VisionConfig.global_context), unless a Grad-CAM layer (block) is given: there the text side need not attend to the object to see it, so the
cross-attention maps do not point at it, and "gradcam" otherwise (the official towers). The text is fed
[ENC] first, as in matching; [ENC] and [SEP] have no map.
"""
from __future__ import annotations

import io
import json
import re
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image

from .factory import DTYPE_NAMES
from .med import record_cross_attention
from .tokenizer import ENC_ID, pre_caption

__all__ = ["gradcam", "overlay", "heat_png", "add_cli", "METHODS"]

METHODS = ("auto", "gradcam", "saliency")


def _normalise(maps: torch.Tensor) -> torch.Tensor:
    """Min-max each (.., gh, gw) map to [0, 1] (LAVIS getAttMap); a flat map becomes zeros."""
    flat = maps.flatten(-2)
    lo, hi = flat.min(-1, keepdim=True).values, flat.max(-1, keepdim=True).values
    span = hi - lo
    out = torch.where(span > 0, (flat - lo) / span.clamp(min=torch.finfo(flat.dtype).tiny), torch.zeros_like(flat))
    return out.view_as(maps)


def _words(tokens: list[str]) -> list[list[int]]:
    """Token indices grouped into whole words: a '##' piece joins the word before it."""
    groups: list[list[int]] = []
    for i, t in enumerate(tokens):
        if t.startswith("##") and groups:
            groups[-1].append(i)
        else:
            groups.append([i])
    return groups


def gradcam(model, image, text: str, block: int | None = None, max_length: int = 35, method: str = "auto") -> dict:
    """Grounding of `text` in `image` (a path, PIL image, bytes or a (1, 3, H, W) tensor), by `method`
    ("gradcam", "saliency" or "auto"; see the module docstring).

    block: for "gradcam", the text encoder layer whose cross-attention is explained (default depth // 2,
    LAVIS's block 6 of 12, but never the last layer, where the text tokens' attention has no gradient).
    Returns {"tokens", "words", "word_maps" (n_words, gh, gw), "text_map" (gh, gw), "token_cams"
    (n_tokens, gh, gw, unnormalised; "gradcam" only), "itm" (P(match)), "grid" (gh, gw), "block" (None for
    "saliency"), "method"}; the maps are CPU float tensors, word_maps and text_map each min-max normalised
    to [0, 1].
    """
    model._require("match", model.has("text_encoder", "itm_head"))
    if not isinstance(text, str):
        raise TypeError(f"text must be a string, got {repr(text)[:60]}")
    if method not in METHODS:
        raise ValueError(f"method must be one of {', '.join(METHODS)}, not {method!r}")
    if method == "auto":  # a layer asked for is a Grad-CAM layer
        method = "saliency" if block is None and model.config.vision.global_context else "gradcam"
    if method == "saliency" and block is not None:
        raise ValueError("block picks the cross-attention layer of method 'gradcam'; 'saliency' has none")
    layers = model.text_encoder.layers
    depth = len(layers)
    if method == "gradcam" and block is None:
        # never the last layer: only [ENC] reaches the ITM head from there, text tokens get no gradient
        block = max(0, min(depth // 2, depth - 2))
    if method == "gradcam" and not 0 <= block < depth:
        raise ValueError(f"block must be in 0..{depth - 1} (the text encoder has {depth} layers), got {block}")
    ids, mask = model._texts([text], max_length, ENC_ID)
    n_tokens = int(mask.sum()) - 2  # without [ENC] and [SEP]
    if n_tokens < 1:
        raise ValueError("text has no tokens to ground")
    with torch.no_grad():  # not inference_mode: its tensors cannot take part in the backward below
        pixels = model.pixels(image)
        if pixels.shape[0] != 1:
            raise ValueError(f"give one image, got {pixels.shape[0]}")
        image_states = model.visual_encoder(pixels).to(model.text_dtype)
    patch = model.config.vision.patch_size
    gh, gw = pixels.shape[-2] // patch, pixels.shape[-1] // patch
    pieces = [model.tokenizer._tok.id_to_token(i) for i in ids[0, 1:1 + n_tokens].tolist()]
    groups = _words(pieces)
    words = [pieces[g[0]] + "".join(pieces[i][2:] for i in g[1:]) for g in groups]
    out = {"tokens": pieces, "words": words, "grid": (gh, gw), "block": block if method == "gradcam" else None,
           "method": method}
    if method == "saliency":
        text_map, word_maps, itm = _saliency(model, image_states, ids, mask, groups)
        return {**out, "word_maps": _normalise(word_maps.view(-1, gh, gw)),
                "text_map": _normalise(text_map.view(gh, gw)), "itm": itm}
    with torch.enable_grad(), record_cross_attention(layers[block].crossattention.self) as probs:
        logits = model.itm_logits(image_states, ids, mask).float()
        (grad,) = torch.autograd.grad(logits[0, 1], probs[0])
    attn = probs[0].detach()
    cam = (attn * grad.clamp(min=0)).mean(1)[0]  # (T, 1 + gh * gw): heads averaged
    cam = cam[1:1 + n_tokens, 1:].reshape(n_tokens, gh, gw).float().cpu()
    word_cams = torch.stack([cam[g].mean(0) for g in groups])
    return {**out, "word_maps": _normalise(word_cams), "text_map": _normalise(cam.mean(0)), "token_cams": cam,
            "itm": float(logits.detach().softmax(-1)[0, 1])}


def _saliency(model, image_states, ids, mask, groups) -> tuple[torch.Tensor, torch.Tensor, float]:
    """relu(sum over channels of gradient x input) on the patch tokens, for the ITM match logit: the text's
    map (P,) and one map per word (n_words, P): what the text's map loses when that word is left out. One
    batched backward: row 0 is the whole text, row 1 + w the text with word w's pieces masked out of the
    self-attention (as if deleted; the other tokens keep their positions)."""
    n = 1 + len(groups)
    masks = mask.expand(n, -1).clone()
    for w, g in enumerate(groups):
        masks[1 + w, [1 + i for i in g]] = 0
    states = image_states.expand(n, -1, -1).clone().requires_grad_()
    with torch.enable_grad():
        logits = model.itm_logits(states, ids.expand(n, -1), masks).float()
        (grad,) = torch.autograd.grad(logits[:, 1].sum(), states)
    maps = (grad * states.detach())[:, 1:].sum(-1).clamp(min=0).float().cpu()
    return maps[0], (maps[:1] - maps[1:]).clamp(min=0), float(logits.detach()[0].softmax(-1)[1])


def peak(heat: torch.Tensor) -> tuple[int, int]:
    """(row, column) of a (gh, gw) map's largest value."""
    i = int(heat.flatten().argmax())
    return i // heat.shape[1], i % heat.shape[1]


def upsample(heat: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """A (gh, gw) map resized bicubically to (height, width), clipped back to [0, 1]."""
    h, w = size
    out = F.interpolate(heat.float()[None, None], size=(h, w), mode="bicubic", align_corners=False)
    return out[0, 0].clamp(0, 1)


def overlay(image: Image.Image, heat: torch.Tensor, alpha: float = 0.5, cmap: str = "jet") -> Image.Image:
    """The image with the heat map (gh, gw, values in [0, 1]) upsampled to its size, coloured and blended."""
    from matplotlib import colormaps  # deferred: matplotlib's import is slow
    if not 0 <= alpha <= 1:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    image = image.convert("RGB")
    up = upsample(heat.detach().cpu(), (image.height, image.width)).numpy()
    colour = (colormaps[cmap](up)[..., :3] * 255).round().astype("uint8")
    return Image.blend(image, Image.fromarray(colour, mode="RGB"), alpha)


def heat_png(image: Image.Image, heat: torch.Tensor, alpha: float = 0.5) -> bytes:
    """`overlay` encoded as PNG bytes."""
    buf = io.BytesIO()
    overlay(image, heat, alpha).save(buf, format="PNG")
    return buf.getvalue()


# ----------------------------------------------------------------------------- command line

def _safe(word: str) -> str:
    return re.sub(r"[^\w-]+", "_", word) or "word"


def cmd_ground(args) -> int:
    from .cli import CliError, _model, _one_image
    if not args.out.lower().endswith(".png"):
        raise CliError(f"--out must be a .png file, got {args.out}")
    model = _model(args, "retrieval")
    image = _one_image(args.image)
    res = gradcam(model, image, args.text, block=args.block, method=args.method)
    maps = {}
    if args.word is not None:
        word = pre_caption(args.word)
        if word not in res["words"]:
            raise CliError(f"--word {args.word!r} is not a word of the text (words: {' '.join(res['words'])})")
        maps[args.out] = (word, res["word_maps"][res["words"].index(word)])
    else:
        maps[args.out] = (None, res["text_map"])
    if args.per_word:
        out = Path(args.out)
        for i, word in enumerate(res["words"]):
            name = f"{out.stem}_{i:02d}_{_safe(word)}.png"
            maps[str(out.with_name(name))] = (word, res["word_maps"][i])
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    for path, (_, heat) in maps.items():
        overlay(image, heat, args.alpha).save(path)
    gh, gw = res["grid"]
    files = [{"path": p, "word": w, "peak": list(peak(h))} for p, (w, h) in maps.items()]
    record = {"image": args.image, "text": args.text, "itm": res["itm"], "grid": [gh, gw], "block": res["block"],
              "method": res["method"], "peak": files[0]["peak"], "words": res["words"], "files": files}
    if args.json:
        print(json.dumps(record))
    else:
        print(f"itm {res['itm']:.4f}\tgrid {gh}x{gw}\t{res['method']}" + (f" block {res['block']}" if res["block"] is not None else ""))
        for f in record["files"]:
            print(f"{f['path']}\t{f['word'] or '(whole text)'}\tpeak row {f['peak'][0]} col {f['peak'][1]}")
    return 0


def add_cli(subparsers) -> None:
    """Register `ground` on the main CLI's subparsers."""
    p = subparsers.add_parser("ground", help="heat map of where the text is in the image",
                              description="Grad-CAM of the ITM score over one cross-attention layer (LAVIS "
                                          "compute_gradcam), or gradient x input on the image tokens "
                                          "(--method saliency); needs a retrieval or pretrained checkpoint")
    p.add_argument("image")
    p.add_argument("--text", "-t", required=True)
    p.add_argument("--out", "-o", required=True, help="PNG to write the overlay to")
    p.add_argument("--word", help="map this word of the text instead of the whole text")
    p.add_argument("--per-word", action="store_true", help="also write OUT_<nn>_<word>.png for every word")
    p.add_argument("--method", choices=METHODS, default="auto",
                   help="gradcam (LAVIS), saliency, or auto: saliency for towers with global_context "
                        "(unless --block is given), else gradcam")
    p.add_argument("--block", type=int, help="gradcam: text encoder layer to explain (default: depth // 2)")
    p.add_argument("--alpha", type=float, default=0.5, help="heat map opacity")
    p.add_argument("--model", "-m", help="checkpoint (default: $BLIP_MODEL); a preset name gives random weights")
    p.add_argument("--task", choices=["pretrain", "retrieval"],
                   help="model to build when it differs from the checkpoint's")
    p.add_argument("--device", help="cpu, cuda, cuda:1 (default: cuda if available)")
    p.add_argument("--dtype", choices=DTYPE_NAMES, help="precision (default fp32)")
    p.add_argument("--json", action="store_true", help="one JSON object: ITM probability, files, peaks")
    p.set_defaults(func=cmd_ground)


if __name__ == "__main__":
    from .cli import main
    sys.exit(main(["ground", *sys.argv[1:]]))
