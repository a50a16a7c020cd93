"""The HTTP API: FastAPI routes that check and decode a request, hand the model work to the
batcher's one model thread, and answer JSON.

Every answer other than 200 is `{"error": kind, "detail": one line}`; an unexpected failure is a
500 with an `id` that names the traceback in the server's log, never the traceback itself.
"""
from __future__ import annotations

import asyncio
import json
import logging
import os
import uuid
from dataclasses import dataclass, field
from functools import partial
from importlib import resources

from fastapi import FastAPI, File, Form, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException

from blip.grounding import METHODS as GROUND_METHODS
from blip.model import MissingPartError
from blip.transform import EvalTransform

from . import tasks
from .batcher import Batcher, QueueFull, Timeout
from .limits import ApiError, Limits, check_text, check_texts, decode_image

log = logging.getLogger("blip.serve")


@dataclass
class Models:
    """The loaded checkpoints and which endpoint uses which: `main` captions (and does the rest when it
    has the parts), `retrieval` matches, classifies, embeds, grounds and searches, `vqa` answers."""
    main: object
    retrieval: object | None = None
    vqa: object | None = None
    index: object | None = None
    names: dict = field(default_factory=dict)  # role -> what it was loaded from, for /health

    @property
    def matcher(self):
        return self.retrieval or self.main

    @property
    def answerer(self):
        return self.vqa or self.main


# the flag that would give an endpoint the part its model lacks, for the 409 message
_HINTS = {"/caption": "--model", "/vqa": "--vqa", "/search": "--retrieval"}


def _add_docs(app: FastAPI) -> None:
    """The OpenAPI page at /docs with Swagger UI's files served from the swagger-ui-bundle package, so it works
    offline (FastAPI's default page loads them from a CDN)."""
    from fastapi.openapi.docs import get_swagger_ui_html
    from fastapi.staticfiles import StaticFiles
    from swagger_ui_bundle import swagger_ui_path
    app.mount("/_swagger", StaticFiles(directory=swagger_ui_path), name="swagger")

    @app.get("/docs", include_in_schema=False)
    async def docs():
        return get_swagger_ui_html(openapi_url=app.openapi_url, title="blip serve - API",
                                   swagger_js_url="/_swagger/swagger-ui-bundle.js",
                                   swagger_css_url="/_swagger/swagger-ui.css", swagger_favicon_url="/_swagger/favicon-32x32.png")


def create_app(models: Models, limits: Limits | None = None, *, max_batch: int = 8, max_wait: float = 0.005,
               max_queue: int = 64, timeout: float = 60.0) -> FastAPI:
    limits = limits or Limits()
    batcher = Batcher(max_batch=max_batch, max_wait=max_wait, max_queue=max_queue, timeout=timeout)
    app = FastAPI(title="blip serve", version="1", description="BLIP captioning, VQA, matching, zero-shot "
                  "classification, embeddings, grounding and image search. Images are multipart uploads "
                  "(field `image`); every error is JSON `{error, detail}`.", docs_url=None)
    _add_docs(app)
    app.state.models, app.state.limits, app.state.batcher = models, limits, batcher
    app.add_middleware(_Guard, body_bytes=limits.body_bytes)
    app.router.add_event_handler("shutdown", batcher.close)
    _add_error_handlers(app)
    transforms: dict[int, EvalTransform] = {}
    decoding = asyncio.Semaphore(min(4, os.cpu_count() or 1))  # a few decoded images in memory at a time

    async def read_image(upload: UploadFile | None, model=None):
        """The upload as a PIL image and, for `model`, its normalised tensor; decoded off the event loop."""
        if upload is None or not hasattr(upload, "read"):
            raise ApiError(422, "invalid", "send the image as a multipart file upload in the field 'image'")
        data = await upload.read(limits.upload_bytes + 1)

        def prepare():
            pil = decode_image(data, limits)
            if model is None:
                return pil, None
            size = model.config.vision.image_size
            return pil, transforms.setdefault(size, EvalTransform(size))(pil)
        async with decoding:
            return await run_in_threadpool(prepare)

    # ------------------------------------------------------------------ pages
    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def page():
        return resources.files("blip.serve").joinpath("page.html").read_text(encoding="utf-8")

    @app.get("/health", summary="Liveness, the loaded models, the queue")
    async def health():
        roles = {"caption": models.main, "match": models.matcher, "vqa": models.answerer}
        return {"status": "ok",
                "models": {role: {"task": m.config.task, "image_size": m.config.vision.image_size,
                                  "source": models.names.get(role)} for role, m in roles.items()},
                "index": {"images": len(models.index)} if models.index is not None else None,
                "queue": {"waiting": len(batcher.waiting), "max": batcher.max_queue},
                "batching": {"max_batch": batcher.max_batch, "max_wait_ms": batcher.max_wait * 1e3,
                             "batches": batcher.batches, "requests": batcher.requests},
                "rss_mb": _rss_mb()}

    # ------------------------------------------------------------------ tasks
    @app.post("/caption", summary="Caption an image (beam search or nucleus sampling)")
    async def caption(image: UploadFile = File(...),
                      num_beams: int = Form(3, ge=1, le=10), max_length: int = Form(20, ge=2, le=64),
                      min_length: int = Form(5, ge=0, le=64), sample: bool = Form(False),
                      top_p: float = Form(0.9, gt=0, le=1), repetition_penalty: float | None = Form(None, gt=0, le=10),
                      prompt: str | None = Form(None), seed: int | None = Form(None, ge=0)):
        model = models.main
        if prompt is not None and len(prompt) > limits.text_chars:
            raise ApiError(422, "too_long", f"prompt longer than {limits.text_chars} characters")
        if min_length > max_length:
            raise ApiError(422, "invalid", f"min_length ({min_length}) exceeds max_length ({max_length})")
        with batcher.preparing("caption"):
            pil, x = await read_image(image, model)
        opts = dict(num_beams=num_beams, max_length=max_length, min_length=min_length, sample=sample,
                    top_p=top_p, repetition_penalty=repetition_penalty, prompt=prompt)
        key = None if seed is not None else ("caption", tuple(sorted(opts.items())))
        out = await batcher.submit(partial(tasks.caption, model, opts, seed), x, key)
        return {"caption": out["caption"], "ids": out["ids"], "width": pil.width, "height": pil.height}

    @app.post("/vqa", summary="Answer questions about an image (generated, or ranked over `answers`)")
    async def vqa(image: UploadFile = File(...), question: list[str] = Form(...),
                  answers: list[str] | None = Form(None)):
        model = models.answerer
        check_texts(question, "question", limits.texts, limits.text_chars)
        if answers is not None:
            check_texts(answers, "answer", limits.answers, limits.text_chars)
        _, x = await read_image(image, model)
        return await batcher.submit(partial(tasks.vqa, model), (x, question, answers))

    @app.post("/match", summary="ITM probability and ITC cosine of an image against several texts")
    async def match(image: UploadFile = File(...), text: list[str] = Form(...),
                    first_token: str = Form("enc", pattern="^(enc|cls)$")):
        model = models.matcher
        check_texts(text, "text", limits.texts, limits.text_chars)
        with batcher.preparing("match"):
            _, x = await read_image(image, model)
        return await batcher.submit(partial(tasks.match, model, first_token), (x, text), ("match", first_token))

    @app.post("/classify", summary="Zero-shot classification: ITC over the labels, ITM rerank of the top ones")
    async def classify(image: UploadFile = File(...), label: list[str] = Form(...),
                       template: str = Form("a picture of {}"), rerank: int = Form(5, ge=0, le=100)):
        model = models.matcher
        check_texts(label, "label", limits.labels, limits.text_chars)
        check_text(template, "template", limits.text_chars)
        if template.count("{}") != 1 or "{" in template.replace("{}", "") or "}" in template.replace("{}", ""):
            raise ApiError(422, "invalid", "template must hold '{}' exactly once, where the label goes")
        _, x = await read_image(image, model)
        return await batcher.submit(partial(tasks.classify, model), (x, label, template, min(rerank, len(label))))

    @app.post("/embed", summary="Image and/or text embeddings (L2-normalised ITC ones when the model has them)")
    async def embed(image: UploadFile | None = File(None), text: list[str] | None = Form(None)):
        model = models.matcher
        if image is None and not text:
            raise ApiError(422, "invalid", "give an image, texts (field 'text'), or both")
        if text:
            check_texts(text, "text", limits.texts, limits.text_chars)
        with batcher.preparing("embed"):
            x = (await read_image(image, model))[1] if image is not None else None
        return await batcher.submit(partial(tasks.embed, model), (x, text or None), ("embed",))

    @app.post("/ground", summary="Heat maps of the ITM score (Grad-CAM or saliency): per word and for the whole text")
    async def ground(image: UploadFile = File(...), text: str = Form(...),
                     method: str = Form("auto", pattern=f"^({'|'.join(GROUND_METHODS)})$")):
        model = models.matcher
        check_text(text, "text", limits.text_chars)
        pil, _ = await read_image(image)
        return await batcher.submit(partial(tasks.ground, model), (pil, text, method), grad=True)

    @app.post("/search", summary="Search the image index by text or by image; ITM rerank of the top k")
    async def search(image: UploadFile | None = File(None), text: str | None = Form(None),
                     k: int = Form(10, ge=1), rerank: bool = Form(True), thumbnails: bool = Form(True)):
        model = models.matcher
        if k > limits.k:
            raise ApiError(422, "too_many", f"k is at most {limits.k}, got {k}")
        if (image is None) == (text is None):
            raise ApiError(422, "invalid", "give either a text query (field 'text') or an image (field 'image')")
        if models.index is None:
            raise ApiError(409, "no_index", "no image index loaded: start blip serve with --index DIR")
        query = check_text(text, "text", limits.text_chars) if text is not None else (await read_image(image))[0]
        rerank = rerank and text is not None  # the ITM head scores image-text pairs: image queries are ITC only
        hits = await batcher.submit(partial(tasks.search, model, models.index), (query, k, rerank))
        if thumbnails:
            thumbs = await run_in_threadpool(lambda: [tasks.thumbnail(h["path"]) for h in hits])
            hits = [{**h, "thumbnail": t} for h, t in zip(hits, thumbs)]
        return {"query": text if text is not None else "<image>", "results": hits}

    return app


def _rss_mb() -> float | None:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError, IndexError):
        return None


# ---------------------------------------------------------------------- errors
def _error(status: int, kind: str, detail: str, **extra) -> JSONResponse:
    headers = {"Retry-After": "1"} if status == 503 else None
    return JSONResponse({"error": kind, "detail": detail, **extra}, status_code=status, headers=headers)


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def api_error(request: Request, e: ApiError):
        return _error(e.status, e.kind, e.message)

    @app.exception_handler(MissingPartError)
    async def missing_part(request: Request, e: MissingPartError):
        flag = _HINTS.get(request.url.path, "--retrieval")
        return _error(409, "wrong_model", f"{e} (start blip serve with {flag} CKPT for {request.url.path})")

    @app.exception_handler(ValueError)
    async def bad_value(request: Request, e: ValueError):  # the model refusing an option (a prompt over max_length)
        log.warning("422 on %s: %s", request.url.path, e)
        return _error(422, "invalid", " ".join(str(e).split()) or type(e).__name__)

    @app.exception_handler(QueueFull)
    async def queue_full(request: Request, e: QueueFull):
        return _error(503, "busy", str(e))

    @app.exception_handler(Timeout)
    async def timeout(request: Request, e: Timeout):
        return _error(504, "timeout", str(e))

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, e: RequestValidationError):
        parts = []
        for err in e.errors():
            where = ".".join(str(p) for p in err.get("loc", ()) if p not in ("body", "query"))
            parts.append(f"{where}: {err.get('msg', 'invalid')}" if where else err.get("msg", "invalid"))
        return _error(422, "invalid", "; ".join(parts) or "invalid request")

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, e: HTTPException):
        return _error(e.status_code, "http", str(e.detail))


class _Guard:
    """Outermost ASGI layer: refuses bodies over `body_bytes` with 413 (by Content-Length, or by
    counting a chunked body as it streams), and turns any exception that escaped the routes into a
    500 JSON answer with an id, the traceback going to the log only."""

    def __init__(self, app, body_bytes: int):
        self.app, self.body_bytes = app, body_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.body_bytes):
            return await _send(send, 413, "too_large", f"request body over {self.body_bytes} bytes")
        state = {"read": 0, "over": False, "started": False}

        async def counted_receive():
            message = await receive()
            state["read"] += len(message.get("body", b""))
            if state["read"] > self.body_bytes:
                state["over"] = True
                raise ApiError(413, "too_large", f"request body over {self.body_bytes} bytes")
            return message

        async def guarded_send(message):
            if state["over"]:  # the form parser turned our 413 into its own 400: answer 413
                if message["type"] == "http.response.start" and not state["started"]:
                    state["started"] = True
                    await _send(send, 413, "too_large", f"request body over {self.body_bytes} bytes")
                return
            state["started"] = state["started"] or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counted_receive, guarded_send)
        except asyncio.CancelledError:
            raise
        except Exception as e:
            if state["over"] and not state["started"]:
                return await _send(send, 413, "too_large", f"request body over {self.body_bytes} bytes")
            error_id = uuid.uuid4().hex[:12]
            log.error("internal error %s on %s %s", error_id, scope.get("method"), scope.get("path"),
                      exc_info=(type(e), e, e.__traceback__))
            if not state["started"]:
                await _send(send, 500, "internal", "internal server error; the server log names it by id",
                            id=error_id)


async def _send(send, status: int, kind: str, detail: str, **extra) -> None:
    body = json.dumps({"error": kind, "detail": detail, **extra}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})
