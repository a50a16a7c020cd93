"""BLIP: one model family for vision-language understanding and generation.

    import blip
    model = blip.load("model_base_caption_capfilt_large")   # or a path, folder or hub id
    model.caption(["photo.jpg"])
"""
__version__ = "0.1.0"

from .checkpoint import CheckpointError  # noqa: E402
from .config import BlipConfig, TextConfig, VisionConfig, get_config  # noqa: E402
from .factory import create_model, load  # noqa: E402
from .model import Blip, MissingPartError  # noqa: E402

__all__ = ["Blip", "BlipConfig", "CheckpointError", "MissingPartError", "TextConfig", "VisionConfig",
           "create_model", "get_config", "load"]
