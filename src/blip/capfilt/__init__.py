"""CapFilt, BLIP's dataset bootstrapping (paper §3.3): a captioner writes synthetic captions for web
images, a filter (ITM) removes the web and synthetic texts that do not match, and the kept pairs form
the new pretraining set.

    import blip.capfilt
    summary = blip.capfilt.bootstrap("model_base_caption_capfilt_large", "model_base_retrieval_coco",
                                     "web.json", "runs/capfilt")

or `blip capfilt --captioner M --filter M --data SRC --out DIR` (docs/capfilt.md). Names are imported
on first use, so registering the command does not load the pipeline.
"""
from .._lazy import lazy_exports

_EXPORTS = {"Options": "pipeline", "bootstrap": "pipeline", "caption_seed": "pipeline",
            "filter_scores": "pipeline", "synthetic_captions": "pipeline", "add_cli": "cli"}
__all__ = sorted(_EXPORTS)

__getattr__ = lazy_exports(__name__, _EXPORTS)
