"""The one checkpoint loader: official `.pth`, Hugging Face BLIP directories, and our own format.

Every format is mapped onto the official key layout (which is also ours), then loaded with one
policy: position embeddings are interpolated, training-only state (momentum encoders, queues) is
set aside with a note, and anything missing, unexpected or of the wrong shape is reported in one
message instead of being dropped in silence. Nothing is unpickled beyond plain tensors
(`torch.load(weights_only=True)`).
"""
from __future__ import annotations

import contextlib
import json
import logging
import math
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .config import BlipConfig, TextConfig, VisionConfig
from .vit import interpolate_pos_embed

log = logging.getLogger("blip")

WEIGHTS = "model.safetensors"
CONFIG = "config.json"


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or does not fit the model."""


# ---------------------------------------------------------------------------------------- keys
TRAINING_ONLY = re.compile(r"^(visual_encoder_m|vision_proj_m|text_encoder_m|text_proj_m|text_decoder_m)\."
                           r"|^(image_queue|text_queue|queue_ptr|idx_queue|ptr_queue)$")
IGNORED = re.compile(r"(^|\.)position_ids$")
OPTIONAL = {"temp"}  # transformers' retrieval model has no temperature; 0.07 is its initial value

# official -> transformers, applied in order (transformers' own converter does the reverse)
_VISION_TO_HF = [
    ("visual_encoder.cls_token", "vision_model.embeddings.class_embedding"),
    ("visual_encoder.pos_embed", "vision_model.embeddings.position_embedding"),
    ("visual_encoder.patch_embed.proj.", "vision_model.embeddings.patch_embedding."),
    ("visual_encoder.norm.", "vision_model.post_layernorm."),
    ("visual_encoder.blocks.", "vision_model.encoder.layers."),
    (".attn.qkv.", ".self_attn.qkv."),
    (".attn.proj.", ".self_attn.projection."),
    (".norm1.", ".layer_norm1."),
    (".norm2.", ".layer_norm2."),
]


def official_to_hf(key: str) -> str:
    if not key.startswith("visual_encoder."):
        return key
    for old, new in _VISION_TO_HF:
        key = key.replace(old, new)
    return key


def hf_to_official(key: str) -> str:
    if not key.startswith("vision_model."):
        return key
    for old, new in reversed(_VISION_TO_HF):
        key = key.replace(new, old)
    return key


# ---------------------------------------------------------------------------------------- configs
def _count(sd: dict, prefix: str) -> int:
    pat = re.compile(re.escape(prefix) + r"(\d+)\.")
    return 1 + max((int(m.group(1)) for k in sd if (m := pat.match(k))), default=-1)


def infer_task(sd: dict) -> str:
    enc = any(k.startswith("text_encoder.") for k in sd)
    dec = any(k.startswith("text_decoder.") for k in sd)
    itm = "itm_head.weight" in sd
    if not any(k.startswith("visual_encoder.") for k in sd):
        raise CheckpointError("no image encoder weights (visual_encoder.*): not a BLIP checkpoint")
    if enc and any(k.startswith("cls_head.") or ".crossattention.self0." in k for k in sd):
        return "nlvr"
    if enc and dec:
        return "pretrain" if itm else "vqa"
    if dec:
        return "caption"
    if enc:
        return "retrieval" if itm else "feature"
    raise CheckpointError("no text encoder or decoder weights: not a BLIP checkpoint")


def config_from_state_dict(sd: dict, task: str | None = None) -> BlipConfig:
    """Architecture from tensor shapes (heads = width / 64, as in every released model)."""
    sd_task = infer_task(sd)
    vw = sd["visual_encoder.cls_token"].shape[-1]
    patch = sd["visual_encoder.patch_embed.proj.weight"].shape[-1]
    grid = math.isqrt(sd["visual_encoder.pos_embed"].shape[1] - 1)
    vision = VisionConfig(image_size=grid * patch, patch_size=patch, width=vw,
                          depth=_count(sd, "visual_encoder.blocks."), heads=max(1, vw // 64),
                          mlp_ratio=sd["visual_encoder.blocks.0.mlp.fc1.weight"].shape[0] / vw)
    p = "text_encoder." if "text_encoder.embeddings.word_embeddings.weight" in sd else "text_decoder.bert."
    words = sd[p + "embeddings.word_embeddings.weight"]
    tw = words.shape[1]
    cross_key = next((k for k in ("text_encoder.encoder.layer.0.crossattention.self.key.weight",
                                   "text_encoder.encoder.layer.0.crossattention.self0.key.weight",  # NLVR2
                                   "text_decoder.bert.encoder.layer.0.crossattention.self.key.weight") if k in sd), None)
    cross = sd[cross_key].shape[1] if cross_key else None
    text = TextConfig(vocab_size=words.shape[0], width=tw, depth=_count(sd, p + "encoder.layer."),
                      heads=max(1, tw // 64), ffn=sd[p + "encoder.layer.0.intermediate.dense.weight"].shape[0],
                      max_positions=sd[p + "embeddings.position_embeddings.weight"].shape[0],
                      cross_width=None if cross in (None, vw) else cross)
    embed = sd["vision_proj.weight"].shape[0] if "vision_proj.weight" in sd else 256
    return BlipConfig(vision=vision, text=text, embed_dim=embed, task=task or sd_task)


_HF_TASKS = {"BlipForConditionalGeneration": "caption", "BlipForImageTextRetrieval": "retrieval",
             "BlipForQuestionAnswering": "vqa"}


def config_from_hf(data: dict) -> BlipConfig:
    """A transformers BlipConfig dict -> ours, with transformers' defaults for absent fields."""
    arch = (data.get("architectures") or [None])[0]
    if arch not in _HF_TASKS:
        raise CheckpointError(f"unsupported transformers architecture {arch!r}; expected one of {', '.join(_HF_TASKS)}")
    v, t = data.get("vision_config") or {}, data.get("text_config") or {}
    for name, sub in (("vision", v), ("text", t)):
        if sub.get("hidden_act", "gelu") != "gelu":
            raise CheckpointError(f"{name} activation {sub['hidden_act']!r} is not supported")
    vw = v.get("hidden_size", 768)
    vision = VisionConfig(image_size=v.get("image_size", 384), patch_size=v.get("patch_size", 16), width=vw,
                          depth=v.get("num_hidden_layers", 12), heads=v.get("num_attention_heads", 12),
                          mlp_ratio=v.get("intermediate_size", 3072) / vw, layer_norm_eps=v.get("layer_norm_eps", 1e-5))
    cross = t.get("encoder_hidden_size", vw)
    text = TextConfig(vocab_size=t.get("vocab_size", 30524), width=t.get("hidden_size", 768),
                      depth=t.get("num_hidden_layers", 12), heads=t.get("num_attention_heads", 8),
                      ffn=t.get("intermediate_size", 3072), max_positions=t.get("max_position_embeddings", 512),
                      layer_norm_eps=t.get("layer_norm_eps", 1e-12), dropout=t.get("hidden_dropout_prob", 0.0),
                      attention_dropout=t.get("attention_probs_dropout_prob", 0.0),
                      cross_width=None if cross == vw else cross)
    return BlipConfig(vision=vision, text=text, embed_dim=data.get("image_text_hidden_size", 256),
                      task=_HF_TASKS[arch], label_smoothing=data.get("label_smoothing", 0.0) or 0.1)


def _official_layout(config: BlipConfig, where: str) -> None:
    v = config.vision
    if v.stem != "patch" or v.pool != "cls" or v.global_context or v.grid_codes:
        raise CheckpointError(f"{where} has none of blip's own vision options (vision.stem={v.stem!r}, "
                              f"vision.pool={v.pool!r}, vision.global_context={v.global_context}, "
                              f"vision.grid_codes={v.grid_codes}): "
                              "save this model in blip's own format (save_blip)")


def config_to_hf(config: BlipConfig) -> dict:
    _official_layout(config, "transformers' BLIP")
    arch = {v: k for k, v in _HF_TASKS.items()}.get(config.task)
    if arch is None:
        raise CheckpointError(f"transformers has no class for a '{config.task}' model; convert a caption, "
                              "retrieval or vqa model (load with task=...)")
    v, t = config.vision, config.text
    return {
        "architectures": [arch], "model_type": "blip", "image_text_hidden_size": config.embed_dim,
        "label_smoothing": config.label_smoothing,
        "vision_config": {"hidden_size": v.width, "intermediate_size": int(v.width * v.mlp_ratio),
                          "num_hidden_layers": v.depth, "num_attention_heads": v.heads, "image_size": v.image_size,
                          "patch_size": v.patch_size, "layer_norm_eps": v.layer_norm_eps, "hidden_act": "gelu"},
        "text_config": {"vocab_size": t.vocab_size, "hidden_size": t.width, "num_hidden_layers": t.depth,
                        "num_attention_heads": t.heads, "intermediate_size": t.ffn,
                        "max_position_embeddings": t.max_positions, "layer_norm_eps": t.layer_norm_eps,
                        "encoder_hidden_size": config.cross_width, "hidden_act": "gelu",
                        "bos_token_id": 30522, "sep_token_id": 102, "pad_token_id": 0, "eos_token_id": 2},
    }


# ---------------------------------------------------------------------------------------- reading
def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors from a .safetensors or .pth/.bin file; `{'model': ...}` wrappers are unwrapped."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file
        try:
            return load_file(str(path))
        except Exception as e:  # safetensors raises several types for corrupt headers
            raise CheckpointError(f"cannot read {path}: {e}") from None
    obj = load_torch_file(path)
    for key in ("model", "state_dict", "module"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{path} does not hold a state dict of tensors")
    return obj


def torch_load(path: str | Path, mmap: bool = False):
    """The one `torch.load` call: weights-only, on the CPU, without torch's warning about the pickle
    protocol (it fires on any file whose first bytes look like a newer protocol, random bytes included,
    and is advice to torch's developers, not to a user)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Detected pickle protocol")
        return torch.load(str(path), map_location="cpu", weights_only=True, mmap=mmap)


def load_torch_file(path: str | Path, mmap: bool = True):
    """`torch.load(weights_only=True)` (memory-mapped if asked and the file allows it); whatever goes wrong
    (a truncated or corrupt file, a pickle of more than tensors) is a CheckpointError naming the file."""
    try:
        try:
            return torch_load(path, mmap=mmap)
        except RuntimeError:  # the legacy (non-zip) format cannot be memory-mapped
            if not mmap:
                raise
            return torch_load(path)
    except Exception as e:  # torch raises RuntimeError, UnpicklingError, EOFError, OSError, ...
        text = str(e).split("WeightsUnpickler error:")[-1]  # past torch's advice to unpickle anything
        why = next((line.strip() for line in text.splitlines() if line.strip()), type(e).__name__)
        raise CheckpointError(f"cannot read {path} as a weights-only PyTorch checkpoint "
                              f"(arbitrary pickles are never executed): {why}") from None


def _find_weights(folder: Path) -> list[Path]:
    """The weight file(s) of a folder: one file, or every shard its index names (transformers writes
    `model.safetensors.index.json` / `pytorch_model.bin.index.json` beside shards past max_shard_size)."""
    for name in (WEIGHTS, "pytorch_model.bin", "model.pth"):
        if (folder / name).exists():
            return [folder / name]
    for index in (folder / f"{WEIGHTS}.index.json", folder / "pytorch_model.bin.index.json"):
        if index.exists():
            try:
                files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            except (json.JSONDecodeError, KeyError, AttributeError, TypeError) as e:
                raise CheckpointError(f"{index} is not a shard index (a JSON object with a weight_map): {e}") from None
            missing = [f for f in files if not (folder / f).is_file()]
            if missing or not files:
                raise CheckpointError(f"{index} names shards that are not in {folder}: {', '.join(missing) or 'none'}")
            return [folder / f for f in files]
    shards = sorted(folder.glob("*.safetensors"))
    if len(shards) == 1:
        return shards
    raise CheckpointError(f"no weights (model.safetensors or pytorch_model.bin, or a shard index) in {folder}")


def _read_weights(files: list[Path]) -> dict[str, torch.Tensor]:
    sd: dict[str, torch.Tensor] = {}
    for f in files:
        part = read_state_dict(f)
        clash = sorted(set(part) & set(sd))
        if clash:
            raise CheckpointError(f"{f} repeats tensors of another shard: {', '.join(clash[:3])}")
        sd.update(part)
    return sd


def read_checkpoint(path: str | Path, task: str | None = None) -> tuple[BlipConfig, dict[str, torch.Tensor]]:
    """(config, state dict in official layout) from any supported local file or folder."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint not found: {path}")
    if path.is_dir():
        cfg_file = path / CONFIG
        if not cfg_file.exists():
            raise CheckpointError(f"{path} has no {CONFIG}")
        try:
            data = json.loads(cfg_file.read_text())
        except ValueError as e:  # JSONDecodeError, UnicodeDecodeError
            raise CheckpointError(f"{cfg_file} is not valid JSON: {e}") from None
        if not isinstance(data, dict):
            raise CheckpointError(f"{cfg_file} is not a JSON object")
        sd = _read_weights(_find_weights(path))
        with _unusable(str(cfg_file)):
            config = BlipConfig.from_dict(data) if data.get("format") == "blip" else config_from_hf(data)
        if data.get("format") != "blip":
            sd = {hf_to_official(k): v for k, v in sd.items()}
        if task and task != config.task:
            config = config.replace(task=task)
        return config, sd
    sd = read_state_dict(path)
    if any(k.startswith("vision_model.") for k in sd):
        raise CheckpointError(f"{path} looks like a transformers checkpoint: load its folder (with config.json)")
    with _unusable(f"cannot infer the architecture of {path} from its tensors"):
        return config_from_state_dict(sd, task), sd


@contextlib.contextmanager
def _unusable(where: str):
    """A config value or tensor shape that the code reading it cannot use (a missing key, a string where
    a number belongs, a tensor of the wrong rank) becomes one CheckpointError saying where it came from."""
    try:
        yield
    except CheckpointError:
        raise
    except KeyError as e:
        raise CheckpointError(f"{where}: {e.args[0]!r} is missing") from None
    except (TypeError, AttributeError, IndexError, ValueError, ZeroDivisionError) as e:
        raise CheckpointError(f"{where}: {e}") from None


# ---------------------------------------------------------------------------------------- loading
@dataclass
class LoadReport:
    loaded: int = 0
    training_only: list[str] = field(default_factory=list)
    unused_parts: list[str] = field(default_factory=list)
    interpolated: list[str] = field(default_factory=list)
    defaults: list[str] = field(default_factory=list)

    def notes(self) -> list[str]:
        out = []
        if self.training_only:
            out.append(f"set aside {len(self.training_only)} training-only tensors (momentum encoders, queues)")
        if self.unused_parts:
            out.append(f"set aside {len(self.unused_parts)} tensors of parts this task does not use "
                       f"({', '.join(sorted({k.split('.')[0] for k in self.unused_parts}))})")
        out += [f"interpolated {k} to the model's image size" for k in self.interpolated]
        out += [f"{k} not in checkpoint: kept its initial value" for k in self.defaults]
        return out


def _tie_groups(model: torch.nn.Module) -> dict[str, set[str]]:
    by_ptr: dict[int, set[str]] = {}  # by object identity: meta tensors all have data_ptr 0
    for name, t in model.state_dict(keep_vars=True).items():
        by_ptr.setdefault(id(t), set()).add(name)
    return {n: g for g in by_ptr.values() for n in g}


def _retie(model: torch.nn.Module, ties: dict[str, set[str]], loaded) -> None:
    """After `assign=True` loading, point every alias of a shared tensor back at the loaded one."""
    params = dict(model.named_parameters(remove_duplicate=False))
    for name, group in ties.items():
        source = next((g for g in sorted(group) if g in loaded), None)
        if source is None or source == name or name not in params:
            continue
        module_path, _, attr = name.rpartition(".")
        setattr(model.get_submodule(module_path), attr, params[source])


def _short(keys: list[str], n: int = 8) -> str:
    return ", ".join(keys[:n]) + (f" ... (+{len(keys) - n} more)" if len(keys) > n else "")


def _not_finite(tensors: dict[str, torch.Tensor]) -> list[str]:
    """Names of the float tensors holding NaN or Inf. A sum is finite exactly when every element is (unless
    it overflows, which the exact check then settles), and runs at memory speed without allocating (20x
    faster than isfinite). On one thread: a parallel reduction per tensor waits at its barrier for a thread
    the OS has descheduled, which on a busy 2-core machine made the pass over `base` 1.4 s instead of 0.1."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return [k for k, t in tensors.items() if t.is_floating_point()
                and not (torch.isfinite(t.sum()) or torch.isfinite(t).all())]
    finally:
        torch.set_num_threads(threads)


def load_into(model: torch.nn.Module, sd: dict[str, torch.Tensor], strict: bool = True) -> LoadReport:
    """Load an official-layout state dict into `model` under the policy in the module docstring."""
    report = LoadReport()
    own = model.state_dict()
    parts = {k.split(".")[0] for k in own}
    ties = _tie_groups(model)
    clean = {}
    for key, value in sd.items():
        if IGNORED.search(key):
            continue
        if TRAINING_ONLY.search(key):
            report.training_only.append(key)
        elif key not in own and key.split(".")[0] not in parts and key.split(".")[0] in (
                "text_encoder", "text_decoder", "vision_proj", "text_proj", "itm_head", "temp"):
            report.unused_parts.append(key)
        else:
            clean[key] = value
    pos = "visual_encoder.pos_embed"
    if pos in clean and pos in own and clean[pos].shape != own[pos].shape and clean[pos].is_floating_point():
        clean[pos] = interpolate_pos_embed(clean[pos], own[pos].shape[1] - 1)
        report.interpolated.append(pos)
    missing = [k for k in own if k not in clean and not (ties[k] & clean.keys())]
    report.defaults = [k for k in missing if k in OPTIONAL]
    missing = [k for k in missing if k not in OPTIONAL]
    unexpected = [k for k in clean if k not in own]
    mismatched = [f"{k} {tuple(clean[k].shape)} vs {tuple(own[k].shape)}"
                  for k in clean if k in own and clean[k].shape != own[k].shape]
    wrong_kind = [f"{k} {clean[k].dtype} vs {own[k].dtype}" for k in clean
                  if k in own and clean[k].is_floating_point() != own[k].is_floating_point()]
    good = {k: v.to(own[k].dtype) for k, v in clean.items()  # fp16/fp64 files load in the model's dtype
            if k in own and v.shape == own[k].shape and v.is_floating_point() == own[k].is_floating_point()}
    not_finite = _not_finite(good)
    if not_finite or (strict and (missing or unexpected or mismatched or wrong_kind)):
        problems = []
        if missing:
            problems.append(f"missing {len(missing)}: {_short(missing)}")
        if unexpected:
            problems.append(f"unexpected {len(unexpected)}: {_short(unexpected)}")
        if mismatched:
            problems.append(f"wrong shape {len(mismatched)}: {_short(mismatched)}")
        if wrong_kind:
            problems.append(f"wrong dtype {len(wrong_kind)}: {_short(wrong_kind)}")
        if not_finite:  # a diverged or corrupted run: refused even with strict=False
            problems.append(f"NaN or Inf in {len(not_finite)}: {_short(not_finite)}")
        raise CheckpointError("checkpoint cannot be loaded into the model — " + "; ".join(problems))
    on_meta = any(t.is_meta for t in own.values())
    model.load_state_dict(good, strict=False, assign=on_meta)
    if on_meta:
        _retie(model, ties, good.keys())
    report.loaded = len(good)
    for note in report.notes():
        log.info(note)
    return report


# ---------------------------------------------------------------------------------------- writing
def _dedupe(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """State dict with each shared tensor once (safetensors refuses aliases); ties are restored on load."""
    seen, out = set(), {}
    for k, t in model.state_dict().items():
        if t.data_ptr() in seen and t.numel():
            continue
        seen.add(t.data_ptr())
        out[k] = t.detach().contiguous().cpu()
    return out


def save_blip(model, folder: str | Path) -> Path:
    from safetensors.torch import save_file
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    data = {"format": "blip", **model.config.to_dict()}
    save_file(_dedupe(model), str(folder / WEIGHTS), metadata={"format": "pt"})
    (folder / CONFIG).write_text(json.dumps(data, indent=2) + "\n")
    return folder


def save_official(model, path: str | Path) -> Path:
    _official_layout(model.config, "the official BLIP code")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    from .vocab import untrimmed_state_dict
    sd = untrimmed_state_dict(model, {k: t.detach().cpu() for k, t in model.state_dict().items()})
    torch.save({"model": sd}, str(path))
    return path


def save_hf(model, folder: str | Path) -> Path:
    from safetensors.torch import save_file
    config = config_to_hf(model.config)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    from .vocab import untrimmed_state_dict
    sd = {official_to_hf(k): v for k, v in untrimmed_state_dict(model, _dedupe(model)).items()}
    save_file(sd, str(folder / WEIGHTS), metadata={"format": "pt"})
    (folder / CONFIG).write_text(json.dumps(config, indent=2) + "\n")
    return folder
