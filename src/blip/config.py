"""Typed model configuration with named presets.

One dataclass per tower plus a top-level `BlipConfig`; everything round-trips through JSON so a
checkpoint directory fully describes its model, and any field can be overridden from the CLI with
dotted `key=value` pairs (`vision.image_size=224`).
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# Which parts a task model owns. One MED implementation serves them all; a task only decides
# which towers and heads exist and what the decoder cross-attends to.
TASKS = ("pretrain", "caption", "retrieval", "vqa", "feature")


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


@dataclass
class BlipConfig:
    vision: VisionConfig = field(default_factory=VisionConfig)
    text: TextConfig = field(default_factory=TextConfig)
    embed_dim: int = 256  # ITC projection width
    task: str = "pretrain"
    prompt: str = "a picture of "
    label_smoothing: float = 0.1

    def __post_init__(self):
        if isinstance(self.vision, dict):
            self.vision = VisionConfig(**self.vision)
        if isinstance(self.text, dict):
            self.text = TextConfig(**self.text)
        if self.task not in TASKS:
            raise ValueError(f"unknown task {self.task!r}; expected one of {', '.join(TASKS)}")
        for tower in (self.vision, self.text):
            if tower.width % tower.heads:
                raise ValueError(f"width {tower.width} is not a multiple of heads {tower.heads}")
        if self.vision.image_size % self.vision.patch_size:
            raise ValueError("image_size must be a multiple of patch_size")

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
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - known - {"format", "version"}
        if unknown:
            raise ValueError(f"unknown config keys: {sorted(unknown)}")
        return cls(**{k: v for k, v in data.items() if k in known})

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
            target, name = (data, node) if not rest else (data[node], rest[0])
            if node not in data or (rest and rest[0] not in data[node]):
                raise ValueError(f"unknown config key {key!r}")
            target[name] = _coerce(value, target[name])
        return BlipConfig.from_dict(data)


def _coerce(value: Any, current: Any) -> Any:
    """Parse a CLI string into the type of the field it overrides."""
    if not isinstance(value, str) or isinstance(current, str):
        return value
    if isinstance(current, bool):
        if value.lower() in ("1", "true", "yes"):
            return True
        if value.lower() in ("0", "false", "no"):
            return False
        raise ValueError(f"expected a boolean, got {value!r}")
    if value.lower() in ("none", "null"):
        return None
    if isinstance(current, int):
        return int(value)
    if isinstance(current, float):
        return float(value)
    return json.loads(value) if current is None and value[:1].isdigit() else value


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
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; expected one of {', '.join(PRESETS)}")
    config = PRESETS[name]()
    return config.replace(**overrides) if overrides else config
