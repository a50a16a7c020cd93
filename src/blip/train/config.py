"""Training configuration: one typed dataclass, read from a JSON file plus `key=value` overrides.

Keys starting with "_" are comments. `model.<dotted key>=value` overrides the model preset
(e.g. `model.vision.grad_checkpointing=true`).
"""
from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..config import check_types, known_keys
from .schedule import SCHEDULES


@dataclass
class TrainConfig:
    # model
    task: str = "pretrain"                 # objective: pretrain, caption, retrieval, vqa, nlvr (train/tasks)
    model: str = "tiny"                    # preset: tiny, mini, small, base, large
    model_overrides: dict = field(default_factory=dict)  # dotted BlipConfig keys
    init_text: str | None = None           # BERT weights in HF layout, or "minilm"
    init_vision: str | None = None         # timm/DeiT ViT weights
    init: str | None = None                # a whole BLIP checkpoint, anything blip.load takes (official name,
    #                                        .pth, HF folder or hub id, our folder): the task's parts are loaded
    init_scheme: str = "official"          # from-scratch init: "official" (timm / BERT, std 0.02) or "clip"
    #                                        (CLIP's larger ViT and attention query/key init: train/init_weights)
    whiten_stem: bool = False              # a from-scratch conv stem's first convolution set to whiten the first
    #                                        training images' 3x3 patches (train/init_weights.whiten_stem)
    vocab_from: list[str] | None = None    # keep only the tokens these JSON annotation files use (and the special
    #                                        tokens) in the text embeddings and LM head (blip.vocab). None: all
    # data
    train_files: list[str] = field(default_factory=list)  # JSON lists of {"image", "caption"}
    image_root: str | dict[str, str] | None = None  # or per dataset: {"vqa": folder, "vg": folder} (VQA)
    shards: list[str] = field(default_factory=list)  # tar shards (paths, globs, {a..b}): a stream
    shuffle_buffer: int = 1000             # stream shuffle buffer (shards only)
    similar_groups: int = 0                # batches of groups of N items whose captions share the most words
    #                                        (hard in-batch negatives, train_files only); 0: random (official)
    val_file: str | None = None            # annotation file validated after every epoch (best -> out/model)
    test_file: str | None = None           # evaluated once with the best model at the end
    answer_list: str | None = None         # VQA: candidate answers for rank inference (answer_list.json)
    task_options: dict = field(default_factory=dict)  # extra keyword arguments of the task's objective
    eval_options: dict = field(default_factory=dict)  # keyword arguments of blip.eval.<task>.evaluate
    synthetic_pairs: int = 0               # random in-memory pairs (tests, smoke runs)
    image_size: int | None = None          # None: the preset's
    min_scale: float = 0.2                 # RandomResizedCrop scale (0.2 pretrain, 0.5 finetune)
    randaugment: bool = True
    hflip: bool = True                     # random horizontal flip (official); off when captions say left/right
    max_words: int = 30
    max_length: int | None = None          # text truncation in tokens; None: the task's (pretrain 30, caption 40,
    #                                        retrieval 35: the official values)
    text_padding: str = "longest"          # or "max_length" (official; forced with negatives_all_rank)
    batch_size: int = 4                    # per rank, per micro-batch
    num_workers: int = 0
    epochs: int = 1
    steps_per_epoch: int = 0               # caps an epoch; needed for streams (no length); 0: from the data
    max_steps: int = 0                     # stop after this many optimizer steps (0: all epochs)
    # optimisation
    schedule: str = "step_warmup"          # or "cosine" (per epoch), "warmup_cosine" (per step: short runs)
    init_lr: float = 3e-4
    min_lr: float = 1e-6
    warmup_lr: float = 1e-6
    warmup_steps: int = 3000
    lr_decay: float = 0.9
    weight_decay: float = 0.05
    lr_scales: dict[str, float] = field(default_factory=dict)  # {regex: lr multiplier}: first re.search match on a
    #                                        parameter name (official layout, e.g. "visual_encoder.blocks.0...");
    #                                        unmatched parameters: 1. Empty: one group (official)
    grad_accum: int = 1
    grad_clip: float = 0.0                 # 0: none (official)
    bf16: bool = False                     # bf16 autocast where the device computes bf16 natively (CUDA, or a CPU
    #                                        with AVX-512 BF16 / AMX); elsewhere fp32, with a notice
    bf16_emulated: bool = False            # bf16 autocast even where it is emulated (AVX2 CPUs: several times slower)
    # objective
    queue_size: int = 57600
    queue_init: str = "empty"              # "empty": unwritten slots left out; "random": official unit vectors
    alpha: float = 0.4
    alpha_ramp_epochs: float | None = None  # None: the task's (pretrain 2, retrieval 1: official)
    momentum: float = 0.995
    negatives_all_rank: bool = False
    label_smoothing: float = 0.1
    loss_weights: dict = field(default_factory=dict)  # {"ita", "itm", "lm": weight}; unnamed: 1 (official)
    itm_hard_from: int | None = 0          # ITM's in-batch negatives drawn uniformly (not by similarity) before
    #                                        this step; None: always uniform
    itm_swap_from: int = 0                 # word-swap ITM negatives (itm_swap_words) from this step on
    itc_only_steps: int = 0                # first N optimizer steps train ITC alone (ITM and LM not computed)
    itm_pairs: int | None = None           # ITM on the first N pairs of each batch only (None: all, official)
    itc_swap_negatives: bool = False       # the word-swap captions are ITC text negatives too (distill=False)
    image_words: float = 0.0               # weight of an extra loss: the image tower's patches predict which
    #                                        vocabulary words the caption holds (SuperClass-style); 0: off (official)
    mlm: float = 0.0                       # weight of ALBEF's image-grounded masked-language loss on the [ENC]
    #                                        encoder (15% of words); 0: off (official BLIP has none)
    rtd: float = 0.0                       # weight of replaced-token detection on the word-swap ITM negatives:
    #                                        the ITM head on every token says which the swap put in; 0: off
    itm_swap_weight: float = 1.0           # retrieval: weight of each word-swap negative in the ITM loss (the
    #                                        other pairs 1): below 1, a swap the model cannot yet tell from the
    #                                        true caption pulls the true caption's probability down less
    distill: bool = True                   # momentum towers + distilled ITC targets (official); False: in-batch
    #                                        InfoNCE on the online features (needs queue_size 0)
    itm_swap_words: Any = None             # ITM negatives: each caption with one alternative of a group replaced
    #                                        by another: [[word, "a phrase", [synonym, synonym]], ...], or
    #                                        "synthetic" (the corpus's colours, shapes, sizes, position and
    #                                        relation phrases). None: off (official)
    itm_swap_pick: str = "word"            # which word a swap replaces: "word" (any, alike) or "group" (a group
    #                                        present in the caption first, alike, then a word of it) or "rare"
    #                                        (a group first, weighted by 1 / the share of training texts naming it)
    negative_pool: str | None = None       # retrieval: a caption list (e.g. the web pairs a CapFilt filter will
    #                                        score) whose texts are one more ITM negative per image, drawn
    #                                        uniformly; they must be of other images. None: off (official)
    negative_pool_draws: int = 1           # retrieval: pool texts per image and step
    # run
    seed: int = 42
    device: str | None = None
    log_interval: int = 50
    ckpt_interval: int = 1000              # optimizer steps; epoch ends always checkpoint
    progress: bool = True

    def __post_init__(self):
        if isinstance(self.shards, str):
            self.shards = [self.shards]
        if isinstance(self.train_files, str):
            self.train_files = [self.train_files]
        if isinstance(self.vocab_from, str):
            self.vocab_from = [self.vocab_from]
        check_types(self)
        counts = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "seed"}
        negative = [k for k, v in counts.items() if type(v) in (int, float) and v < 0]
        if negative:
            raise ValueError(f"config keys {negative} must be >= 0")
        if self.grad_accum < 1 or self.batch_size < 1:
            raise ValueError("batch_size and grad_accum must be >= 1")
        from .tasks import TASKS
        if self.task not in TASKS:
            raise ValueError(f"unknown task {self.task!r}; expected one of {', '.join(TASKS)}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"unknown schedule {self.schedule!r}")
        if self.init_scheme not in ("official", "clip"):
            raise ValueError(f"init_scheme must be 'official' or 'clip', not {self.init_scheme!r}")
        if self.whiten_stem and (self.init or self.init_vision):
            raise ValueError("whiten_stem initialises a from-scratch image tower; init / init_vision load one")
        if self.text_padding not in ("longest", "max_length"):
            raise ValueError("text_padding must be 'longest' or 'max_length'")
        if self.similar_groups and (self.shards or self.synthetic_pairs):
            raise ValueError("similar_groups orders a caption file's items: it needs train_files, not shards "
                             "or synthetic_pairs")
        if self.similar_groups and not 2 <= self.similar_groups <= self.batch_size:
            raise ValueError(f"similar_groups must be 0 or in 2..batch_size ({self.batch_size}), "
                             f"got {self.similar_groups}")
        if self.itc_swap_negatives and (self.distill or not self.itm_swap_words):
            raise ValueError("itc_swap_negatives needs distill=false and itm_swap_words (the captions it adds)")
        if self.rtd and not self.itm_swap_words:
            raise ValueError("rtd reads the word-swap ITM negatives: it needs itm_swap_words")
        if self.itm_swap_weight != 1.0 and (self.task != "retrieval" or not self.itm_swap_words
                                            or self.itm_swap_weight < 0):
            raise ValueError("itm_swap_weight (>= 0) weighs retrieval finetuning's word-swap ITM negatives: it needs "
                             "task retrieval and itm_swap_words")
        if self.negative_pool_draws < 1:
            raise ValueError("negative_pool_draws must be at least 1")
        if self.negative_pool and self.task != "retrieval":
            raise ValueError(f"negative_pool is an option of retrieval finetuning (the CapFilt filter), not of "
                             f"task {self.task!r}")
        if self.negatives_all_rank:  # token ids are gathered across ranks: equal widths
            self.text_padding = "max_length"
        for pattern in self.lr_scales:
            try:
                re.compile(pattern)
            except re.error as e:
                raise ValueError(f"lr_scales key {pattern!r} is not a regular expression: {e}") from None
        self.model_config()  # a wrong preset, task or model override fails here, not when training starts

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "TrainConfig":
        comments = {k for k in data if isinstance(k, str) and k.startswith("_")} if isinstance(data, dict) else set()
        return cls(**known_keys(cls, data, "", extra=comments))

    @classmethod
    def load(cls, path: str | Path | None = None, overrides: list[str] | None = None) -> "TrainConfig":
        data = {}
        if path:
            try:
                data = json.loads(Path(path).read_text())
            except ValueError as e:  # JSONDecodeError, UnicodeDecodeError
                raise ValueError(f"{path} is not a JSON file: {e}") from None
        return cls.from_dict(apply_overrides(data, overrides or []))

    def model_config(self, base=None):
        """The model to train: the preset (or `base`, the architecture of the init checkpoint) for this
        task, with model_overrides and image_size applied."""
        from ..config import get_config
        from .tasks import task_module
        overrides = dict(self.model_overrides, task=task_module(self.task).MODEL_TASK)
        if self.image_size:
            overrides["vision.image_size"] = self.image_size
        if base is not None:
            return base.replace(**overrides)
        return get_config(self.model, **overrides)


def _value(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """`key=value` pairs (value parsed as JSON when it is JSON) onto a config dict."""
    nested = data.get("model_overrides", {}) if isinstance(data, dict) else None
    if not isinstance(nested, dict):
        return data  # not an object: TrainConfig.from_dict says what is wrong
    data = dict(data, model_overrides=dict(nested))
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"override {item!r} is not key=value")
        if key.startswith("model."):
            data["model_overrides"][key[len("model."):]] = _value(value)
        else:
            data[key] = _value(value)
    return data
