"""Helpers for the serving tests: tiny checkpoints on disk and a real uvicorn on a free loopback port."""
from __future__ import annotations

import asyncio
import io
import socket
import threading
import time

import numpy as np
from PIL import Image


def save_tiny(root) -> dict:
    """Tiny random caption / retrieval / vqa checkpoints in our format, loaded back as the server would."""
    import blip
    from blip.checkpoint import save_blip
    paths = {}
    for seed, task in enumerate(("caption", "retrieval", "vqa")):
        import torch
        torch.manual_seed(seed)
        paths[task] = str(save_blip(blip.create_model("tiny", task=task, device="cpu"), root / task))
    return paths


def png(seed: int, size=(72, 56)) -> bytes:
    """A small picture: coloured blocks from a seed."""
    rng = np.random.default_rng(seed)
    blocks = rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)
    img = Image.fromarray(blocks).resize(size, Image.Resampling.NEAREST)
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


def pil(data: bytes) -> Image.Image:
    return Image.open(io.BytesIO(data)).convert("RGB")


class Served:
    """`app` under a real uvicorn in a thread, on a loopback socket bound to a free port."""

    def __init__(self, app):
        import uvicorn
        self.app = app
        self.loop = None
        app.router.add_event_handler("startup", self._grab_loop)
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]}, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.01)

    async def _grab_loop(self):
        self.loop = asyncio.get_running_loop()

    @property
    def batcher(self):
        return self.app.state.batcher

    def hold_worker(self) -> threading.Event:
        """Occupy the model thread (through the batcher, as a request would) until the event is set:
        requests sent meanwhile pile up in the queue."""
        release = threading.Event()
        before = self.batcher.batches
        asyncio.run_coroutine_threadsafe(self.batcher.submit(lambda payloads: [release.wait(30)], None), self.loop)
        self.wait_for(lambda: self.batcher.batches > before and not self.batcher.waiting)
        return release

    def wait_for(self, condition, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            if time.monotonic() > deadline:
                raise AssertionError("condition not reached")
            time.sleep(0.005)

    def close(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)
