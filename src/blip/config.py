"""Typed model configuration with named presets.

One dataclass per tower plus a top-level `BlipConfig`; everything round-trips through JSON so a
checkpoint directory fully describes its model, and any field can be overridden from the CLI with
dotted `key=value` pairs (`vision.image_size=224`).
"""
from __future__ import annotations

import dataclasses
import json
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# Which parts a task model owns. One MED implementation serves them all; a task only decides
# which towers and heads exist and what the decoder cross-attends to.
TASKS = ("pretrain", "caption", "retrieval", "vqa", "feature", "nlvr")


@dataclass
class VisionConfig:
    image_size: int = 384
    patch_size: int = 16
    width: int = 768
    depth: int = 12
    heads: int = 12
    mlp_ratio: float = 4.0
    layer_norm_eps: float = 1e-6
    drop_path: float = 0.0
    grad_checkpointing: bool = False
    checkpoint_layers: int = 0  # the last N blocks are checkpointed (official `vit_ckpt_layer`); 0 = all
    # "patch" (official): one linear map per patch. "conv": 3x3 convolutions with BatchNorm, ReLU and max
    # pooling down to the patch grid (a hybrid ViT): local, shift-tolerant features a ViT from scratch lacks.
    # "patch_conv": the sum of both, the convolutional branch starting at zero
    stem: str = "patch"
    # what output token 0 (ITC's image feature) holds: "cls" (official); "max": the largest value of each
    # channel over the (normalised) patch tokens, so a small object is not averaged away; "max_prenorm": the
    # same over the residual stream before the final LayerNorm (then normalised): the LayerNorm scales every
    # token alike, so after it a background token's features compete with the object's, before it a feature
    # that fires on a shape stays larger where the shape is (docs/pretraining_synthetic.md has what it gave)
    pool: str = "cls"
    # every patch token plus token 0 on output (after pooling, not official): what the text side cross-attends
    # to then carries the whole image's pooled features wherever it looks. From scratch, cross-attention
    # reads an object's shape only once it has learnt where to look, which took longer than a short run
    # (docs/pretraining_synthetic.md, the readout probe); the pooled token gives it a first-order path.
    global_context: bool = False
    # every patch token plus a fixed 2D sine-cosine code of its grid cell, after the final LayerNorm and the
    # pooling (token 0 unchanged; not official). With no transformer blocks the learnt position table (std
    # 0.01 at init) stays far smaller than the stem's features, and cross-attention, which sees the tokens as
    # a set, cannot tell where anything is: ITM sat at chance on positions and relations.
    grid_codes: bool = False

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2


@dataclass
class TextConfig:
    vocab_size: int = 30524
    width: int = 768
    depth: int = 12
    heads: int = 12
    ffn: int = 3072
    max_positions: int = 512
    layer_norm_eps: float = 1e-12
    dropout: float = 0.1
    attention_dropout: float = 0.1
    cross_width: int | None = None  # K/V input width of cross-attention; None = the vision width
    activation: str = "gelu"
    # a trimmed vocabulary (blip.vocab): the token ids, sorted, that the word embeddings and the LM head keep,
    # one row each; other ids read as [UNK] and are never generated. None = all vocab_size ids
    vocab_ids: list[int] | None = None

    @property
    def rows(self) -> int:
        """Rows of the word embeddings and the LM head."""
        return self.vocab_size if self.vocab_ids is None else len(self.vocab_ids)


@dataclass
class BlipConfig:
    vision: VisionConfig = field(default_factory=VisionConfig)
    text: TextConfig = field(default_factory=TextConfig)
    embed_dim: int = 256  # ITC projection width
    task: str = "pretrain"
    prompt: str = "a picture of "
    label_smoothing: float = 0.1

    def __post_init__(self):
        self.vision = _tower(VisionConfig, self.vision, "vision")
        self.text = _tower(TextConfig, self.text, "text")
        check_types(self)
        if self.task not in TASKS:
            raise ValueError(f"unknown task {self.task!r}; expected one of {', '.join(TASKS)}")
        for name, tower in (("vision", self.vision), ("text", self.text)):
            for f in dataclasses.fields(tower):  # sizes and divisors: 0 fails here, not in a modulo
                # a vision tower of 0 blocks is its stem's tokens, positions and LayerNorm (a CNN with conv)
                zero_ok = f.name == "checkpoint_layers" or (name, f.name) == ("vision", "depth")
                value, least = getattr(tower, f.name), 0 if zero_ok else 1
                if type(value) is int and value < least:
                    raise ValueError(f"{name}.{f.name} must be >= {least}, got {value}")
            if tower.width % tower.heads:
                raise ValueError(f"{name}.width {tower.width} is not a multiple of {name}.heads {tower.heads}")
        ids = self.text.vocab_ids
        if ids is not None:
            from .tokenizer import PAD_ID, UNK_ID
            if not ids or ids != sorted(set(ids)) or ids[0] < 0 or ids[-1] >= self.text.vocab_size:
                raise ValueError(f"text.vocab_ids must be a non-empty list of sorted distinct ids in "
                                 f"[0, {self.text.vocab_size})")
            if PAD_ID not in ids or UNK_ID not in ids:
                raise ValueError(f"text.vocab_ids must keep [PAD] ({PAD_ID}) and [UNK] ({UNK_ID})")
        if self.vision.stem not in ("patch", "conv", "patch_conv"):
            raise ValueError(f"vision.stem must be 'patch', 'conv' or 'patch_conv', got {self.vision.stem!r}")
        if self.vision.stem != "patch" and (self.vision.patch_size < 2 or self.vision.patch_size & (self.vision.patch_size - 1)):
            raise ValueError(f"vision.stem {self.vision.stem!r} needs a power-of-two patch size, "
                             f"got {self.vision.patch_size}")
        if self.vision.pool not in ("cls", "max", "max_prenorm"):
            raise ValueError(f"vision.pool must be 'cls', 'max' or 'max_prenorm', got {self.vision.pool!r}")
        if self.vision.global_context and self.vision.pool == "cls":
            raise ValueError("vision.global_context adds the pooled token 0 to every patch token: "
                             "it needs vision.pool 'max' or 'max_prenorm'")
        if self.vision.image_size % self.vision.patch_size:
            raise ValueError("vision.image_size must be a multiple of vision.patch_size")
        if self.embed_dim < 1:
            raise ValueError(f"embed_dim must be >= 1, got {self.embed_dim}")

    @property
    def cross_width(self) -> int:
        return self.text.cross_width or self.vision.width

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self, path: str | Path | None = None) -> str:
        text = json.dumps(self.to_dict(), indent=2)
        if path is not None:
            Path(path).write_text(text + "\n")
        return text

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "BlipConfig":
        return cls(**known_keys(cls, data, "", extra={"format", "version"}))

    @classmethod
    def from_json(cls, path_or_text: str | Path) -> "BlipConfig":
        p = Path(path_or_text) if not str(path_or_text).lstrip().startswith("{") else None
        data = json.loads(p.read_text() if p else str(path_or_text))
        return cls.from_dict(data)

    def replace(self, **overrides: Any) -> "BlipConfig":
        """Copy with dotted overrides, e.g. replace(**{"vision.image_size": 224, "task": "caption"})."""
        data = self.to_dict()
        for key, value in overrides.items():
            node, *rest = key.split(".")
            target, name = (data, node) if not rest else (data.get(node), rest[0])
            if len(rest) > 1 or not isinstance(target, dict) or name not in target:
                raise ValueError(f"unknown config key {key!r}")
            target[name] = _coerce(value, target[name])
        return BlipConfig.from_dict(data)


def _coerce(value: Any, current: Any) -> Any:
    """Parse a CLI string into the type of the field it overrides; a string that does not parse is
    kept as it is, so that the type check names the key."""
    if not isinstance(value, str) or isinstance(current, str):
        return value
    if isinstance(current, bool):
        return {"1": True, "true": True, "yes": True, "0": False, "false": False, "no": False}.get(value.lower(), value)
    if value.lower() in ("none", "null"):
        return None
    try:
        if isinstance(current, int):
            return int(value)
        if isinstance(current, float):
            return float(value)
        return json.loads(value) if current is None else value
    except ValueError:
        return value


# ---------------------------------------------------------------------------------------- checking
def known_keys(cls, data: Any, prefix: str, extra: frozenset | set = frozenset()) -> dict[str, Any]:
    """`data` as keyword arguments of dataclass `cls`: a JSON object whose keys are its fields."""
    if not isinstance(data, dict):
        raise ValueError(f"{prefix.rstrip('.') or 'a config'} must be a JSON object, got {_show(data)}")
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(prefix + str(k) for k in set(data) - known - extra)
    if unknown:
        raise ValueError(f"unknown config keys: {unknown}")
    return {k: v for k, v in data.items() if k in known}


def _tower(cls, value: Any, name: str):
    return value if isinstance(value, cls) else cls(**known_keys(cls, value, name + "."))


def check_types(obj, prefix: str = "") -> None:
    """Check every field of dataclass `obj` (and of the dataclasses it holds) against its annotation, and
    widen ints given for floats: a wrong-typed value from a JSON file or a key=value override then fails
    at once with a message naming its key, not later as a TypeError deep inside the model or the loop."""
    hints = typing.get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        key, value = prefix + f.name, getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            check_types(value, key + ".")
        else:
            setattr(obj, f.name, _typed(value, hints[f.name], key))


_TYPE_NAMES = {bool: "true or false", int: "an integer", float: "a finite number", str: "a string",
               list: "a list", dict: "an object", type(None): "null"}


def _typed(value: Any, hint: Any, key: str) -> Any:
    """`value` if it is of type `hint` (int, float, bool, str, list[X], dict[str, X], X | None; an int
    stands for a float), else a ValueError naming `key`."""
    if hint is Any:
        return value
    options = typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,)
    for option in options:
        origin, args = typing.get_origin(option) or option, typing.get_args(option)
        if origin is float:
            if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
                return float(value)
        elif isinstance(value, origin) and not (origin is int and isinstance(value, bool)):
            if origin is list and args:
                return [_typed(v, args[0], f"{key}[{i}]") for i, v in enumerate(value)]
            if origin is dict and args:
                return {_typed(k, args[0], f"{key} key"): _typed(v, args[1], f"{key}[{k!r}]") for k, v in value.items()}
            return value
    expected = " or ".join(_TYPE_NAMES.get(typing.get_origin(o) or o, getattr(o, "__name__", str(o))) for o in options)
    raise ValueError(f"config key {key!r} must be {expected}, got {_show(value)}")


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _preset(vision: dict, text: dict, **kw) -> BlipConfig:
    return BlipConfig(vision=VisionConfig(**vision), text=TextConfig(**text), **kw)


PRESETS = {
    # unit tests: a few hundred thousand parameters
    "tiny": lambda: _preset(dict(image_size=64, patch_size=16, width=64, depth=2, heads=2),
                            dict(width=64, depth=2, heads=2, ffn=256, max_positions=128)),
    # the embedded default's CPU recipe (configs/pretrain_synthetic.json): 64 px, patch 8 (an 8x8 grid, so a
    # small synthetic object still covers a patch or more), both towers 192 wide and 4 deep, no dropout
    "mini": lambda: _preset(dict(image_size=64, patch_size=8, width=192, depth=4, heads=3),
                            dict(width=192, depth=4, heads=3, ffn=768, dropout=0.0, attention_dropout=0.0),
                            embed_dim=128),
    # CPU-trainable: the text side matches MiniLM-L6-H384 so it can start from those weights
    "small": lambda: _preset(dict(image_size=128, patch_size=16, width=384, depth=6, heads=6),
                             dict(width=384, depth=6, heads=12, ffn=1536)),
    # ViT-B/16 + BERT-base (the paper's main model)
    "base": lambda: _preset(dict(), dict()),
    # ViT-L/16 + BERT-base
    "large": lambda: _preset(dict(width=1024, depth=24, heads=16), dict()),
}


def get_config(name: str, **overrides: Any) -> BlipConfig:
    """A preset by name (tiny, mini, small, base, large), with dotted overrides."""
    if not isinstance(name, str) or name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; expected one of {', '.join(PRESETS)}")
    config = PRESETS[name]()
    return config.replace(**overrides) if overrides else config
