"""Data for pretraining and finetuning: a synthetic corpus, JSON-annotation and tar-shard datasets.

Names are imported on first use, so `python -m blip.data.synth` runs without a double import.
"""
import importlib

_EXPORTS = {"JsonCaptionDataset": "datasets", "ShardDataset": "datasets", "collate": "datasets",
            "expand_shards": "datasets", "add_cli": "synth", "generate_corpus": "synth"}
__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
