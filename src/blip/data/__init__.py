"""Data for pretraining and finetuning: a synthetic corpus, JSON-annotation and tar-shard datasets.

Names are imported on first use, so `python -m blip.data.synth` runs without a double import.
"""
from .._lazy import lazy_exports

_EXPORTS = {"JsonCaptionDataset": "datasets", "ShardDataset": "datasets", "collate": "datasets",
            "expand_shards": "datasets", "add_cli": "synth", "generate_corpus": "synth"}
__all__ = sorted(_EXPORTS)

__getattr__ = lazy_exports(__name__, _EXPORTS)
