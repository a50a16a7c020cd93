"""`blip serve`: load the checkpoints once, then answer HTTP on loopback (uvicorn)."""
from __future__ import annotations

import ipaddress
import os
import sys
from types import SimpleNamespace


def add_cli(sub) -> None:
    p = sub.add_parser("serve", help="HTTP API and web page: caption, VQA, match, classify, embed, ground, search",
                       description="Serve the loaded checkpoints over HTTP (JSON; images as multipart uploads). "
                                   "The web page is at /, the OpenAPI page at /docs.")
    p.add_argument("--model", "-m", help="main checkpoint (captioning, and the rest when it has the parts); "
                                         "default $BLIP_MODEL; a preset name gives random weights")
    p.add_argument("--retrieval", help="retrieval checkpoint for /match, /classify, /embed, /ground, /search")
    p.add_argument("--vqa", help="VQA checkpoint for /vqa")
    p.add_argument("--index", help="image index folder (`blip index`) for /search; without --retrieval, the "
                                   "checkpoint it was built with serves it")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default loopback only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--device", help="cpu, cuda, cuda:1 (default: cuda if available)")
    p.add_argument("--dtype", choices=["fp32", "bf16", "bf16-full", "fp16"])
    p.add_argument("--max-batch", type=int, default=8, help="requests run as one batch (1: no batching)")
    p.add_argument("--max-wait-ms", type=float, default=5.0, help="how long a request waits for batch-mates")
    p.add_argument("--queue-size", type=int, default=64, help="requests waiting before 503")
    p.add_argument("--timeout", type=float, default=60.0, help="seconds per request before 504")
    p.add_argument("--max-upload-mb", type=float, default=10.0)
    p.add_argument("--max-pixels", type=int, default=40_000_000)
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    p.set_defaults(func=cmd_serve)


def load_models(args):
    """Models from --model / --retrieval / --vqa, as the other commands load them."""
    from blip.cli import _model
    from blip.serve import Models

    def one(name, task):
        return _model(SimpleNamespace(model=name, task=None, device=args.device, dtype=args.dtype), task)

    main_name = args.model or os.environ.get("BLIP_MODEL")
    models = Models(main=one(main_name, "caption"))
    index = None
    retrieval = args.retrieval
    if args.index:
        from blip.index import ImageIndex
        index = ImageIndex.open(args.index)
        if not retrieval and not models.main.has("vision_proj", "text_proj"):
            retrieval = index.info.get("model")  # as `blip search`: the checkpoint the index was built with
    if retrieval:
        models.retrieval = one(retrieval, "retrieval")
    if args.vqa:
        models.vqa = one(args.vqa, "vqa")
    models.names = {"caption": main_name, "match": retrieval or main_name, "vqa": args.vqa or main_name}
    if index is not None:
        index.check_model(models.matcher)  # refused now rather than on the first search
        models.index = index
    return models


def cmd_serve(args) -> int:
    import uvicorn

    from blip.serve import Limits, create_app
    if not _loopback(args.host):
        print(f"blip: warning: binding {args.host}: the API is reachable from other machines, without "
              "authentication", file=sys.stderr)
    for flag, value, least in (("--max-batch", args.max_batch, 1), ("--queue-size", args.queue_size, 1)):
        if value < least:
            raise ValueError(f"{flag} must be >= {least}, got {value}")
    models = load_models(args)
    limits = Limits(upload_bytes=int(args.max_upload_mb * 2**20), pixels=args.max_pixels)
    app = create_app(models, limits, max_batch=args.max_batch, max_wait=args.max_wait_ms / 1e3,
                     max_queue=args.queue_size, timeout=args.timeout)
    # uvicorn's own bound on open connections and tasks (503 past it), well above the model queue's
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level,
                limit_concurrency=max(256, 4 * args.queue_size))
    return 0


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False

