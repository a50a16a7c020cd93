"""BLIP: one model family for vision-language understanding and generation."""
__version__ = "0.1.0"
