"""The paper's whole pipeline as one command, `blip reproduce` (see pipeline.py)."""
from .pipeline import ROWS, Options, Pipeline


def reproduce(corpus, out, **options) -> dict:
    """Runs (or resumes) the pipeline and returns the report's figures (report.json)."""
    from pathlib import Path
    return Pipeline(Options(corpus=Path(corpus), out=Path(out), **options)).run()


__all__ = ["ROWS", "Options", "Pipeline", "reproduce"]
