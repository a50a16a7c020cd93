"""`blip serve`: an HTTP API and a web page over loaded BLIP checkpoints (FastAPI + uvicorn).

    from blip.serve import Models, create_app
    app = create_app(Models(main=blip.load("model_base_caption_capfilt_large")))
"""
from .app import Models, create_app
from .limits import Limits

__all__ = ["Limits", "Models", "create_app"]
