"""Has a pretrained model's image tower learnt the synthetic corpus's shapes, and does its decoder use them?

    python benchmarks/tower_probe.py MODEL [MODEL ...] [--corpus runs/synthetic] [--json]

Two diagnostics behind the captions and ITM figures of benchmarks/synthetic_quality.py, which cannot tell
whether a miss is the tower's or the text side's:
- a linear probe on the frozen tower: a linear layer (binary cross-entropy over the 7 shapes and 11 colours,
  Adam, full batch, 500 steps) on token 0, on the mean patch token, and on both, fitted on the corpus's
  training images less 800 held out and scored on the one-object images of the test split and the held-out
  ones (top shape, top colour; chance 14% and 9%), as benchmarks/vision_probe.py scores a supervised tower;
- the decoder's use of the image: teacher-forced LM loss on the test captions' shape words, colour words and
  other words, with each image's own pixels and with another test image's. Equal losses mean the decoder
  names that attribute from the caption's prior, not from the image (log 7 = 1.95 for a shape word).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
from common import machine  # noqa: E402


def linear_probe(features, labels, held_features, held_labels, single, n_shapes, steps=500):
    mu, sd = features.mean(0), features.std(0) + 1e-6
    a, b = (features - mu) / sd, (held_features - mu) / sd
    g = torch.Generator().manual_seed(0)
    weight = (0.01 * torch.randn(a.shape[1], labels.shape[1], generator=g)).requires_grad_()
    bias = torch.zeros(labels.shape[1], requires_grad=True)
    opt = torch.optim.Adam([weight, bias], lr=1e-2)
    for _ in range(steps):
        loss = F.binary_cross_entropy_with_logits(a @ weight + bias, labels) + 1e-4 * weight.pow(2).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        z = b @ weight + bias
    hit = lambda lo, hi: (z[:, lo:hi].argmax(1) == held_labels[:, lo:hi].argmax(1))[single].float().mean().item()
    return {"shape": round(100 * hit(0, n_shapes), 1), "color": round(100 * hit(n_shapes, None), 1)}


@torch.no_grad()
def word_losses(model, images, captions, shapes, colors) -> dict:
    """Mean teacher-forced LM loss per kind of target word."""
    from blip.tokenizer import DEC_ID
    dec = model.text_decoder
    out = {"shape": [], "color": [], "other": []}
    ids, mask = model._texts(captions, 35, DEC_ID)
    for lo in range(0, len(captions), 64):
        sl = slice(lo, lo + 64)
        hidden = dec.bert(ids[sl], mask[sl], encoder_states=model.visual_encoder(images[sl]), mode="causal")
        logp = dec.cls.rows(hidden[:, :-1]).float().log_softmax(-1)
        loss = -logp.gather(-1, dec.cls.target_rows(ids[sl, 1:]).unsqueeze(-1))[..., 0]
        for b, row in enumerate(ids[sl, 1:]):
            for t, token in enumerate(row.tolist()):
                if not mask[lo + b, t + 1]:
                    break
                word = model.tokenizer._tok.id_to_token(token)
                out["shape" if word in shapes else "color" if word in colors else "other"].append(float(loss[b, t]))
    return {k: round(sum(v) / max(len(v), 1), 3) for k, v in out.items()}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("models", nargs="+")
    ap.add_argument("--corpus", default="runs/synthetic")
    ap.add_argument("--held-out", type=int, default=800)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    import blip
    from blip.data.synth import COLORS, SHAPES
    from vision_probe import load
    corpus = Path(args.corpus)
    meta = json.loads((corpus / "metadata.json").read_text())
    shapes, colors = list(SHAPES), list(COLORS)
    items = meta["pretrain"] + meta["clean"]
    held = meta["test"] + items[-args.held_out:]
    single = torch.tensor([len(t["scene"]["objects"]) == 1 for t in held])
    test = json.loads((corpus / "test.json").read_text())
    results = {"machine": machine(), "one_object_scored_images": int(single.sum()), "models": {}}
    for name in args.models:
        model = blip.load(name, device="cpu").eval()
        size = model.config.vision.image_size
        (xtr, ytr), (xte, yte) = load(corpus, items[:-args.held_out], size, shapes, colors), load(corpus, held, size, shapes, colors)
        with torch.no_grad():
            feats = lambda x: torch.cat([torch.cat([t[:, 0], t[:, 1:].mean(1)], 1)
                                         for t in map(model.visual_encoder, x.split(256))])
            ftr, fte = feats(xtr), feats(xte)
        w = ftr.shape[1] // 2
        probe = {part: linear_probe(ftr[:, sl], ytr, fte[:, sl], yte, single, len(shapes))
                 for part, sl in (("token0", slice(0, w)), ("mean_patch", slice(w, None)), ("both", slice(None)))}
        row = {"linear_probe": probe}
        if getattr(model, "text_decoder", None) is not None:
            images, _ = load(corpus, [{"image": t["image"], "scene": {"objects": []}} for t in test], size, shapes, colors)
            captions = [t["caption"][0] for t in test]
            row["lm_word_loss"] = {"own_image": word_losses(model, images, captions, shapes, colors),
                                   "other_image": word_losses(model, images.roll(1, 0), captions, shapes, colors)}
        results["models"][name] = row
        if not args.json:
            print(name, json.dumps(row), flush=True)
    if args.json:
        print(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
