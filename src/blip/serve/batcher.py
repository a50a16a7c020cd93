"""One model thread, a bounded queue, and micro-batching of concurrent requests.

Every model call runs in one worker thread, one at a time (the models are not thread-safe, and
two calls would only share the same cores), so the event loop stays free to accept, decode and
answer. Requests wait in a bounded queue. Jobs that share a key (a tuple: the kind of call, then
its options) are run as one batch: when the worker is free it takes the oldest waiting job and
every waiting job with its key, up to `max_batch`. It waits up to `max_wait` seconds for more
only while requests of that kind are still being decoded (`preparing`): a lone request runs at
once, and under load requests pile up while the worker is busy, so batches fill without waiting.
"""
from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable, Hashable

import torch


class QueueFull(Exception):
    """More requests are waiting than the queue holds (the server answers 503)."""


class Timeout(Exception):
    """A request waited and ran longer than the per-request timeout (the server answers 504)."""


@dataclass(eq=False)
class Job:
    key: Hashable
    fn: Callable[[list], list]  # payloads -> results, one per payload
    payload: Any
    grad: bool
    future: asyncio.Future
    arrived: float = field(default_factory=time.monotonic)
    dropped: bool = False  # timed out before it ran: skipped


class Batcher:
    def __init__(self, max_batch: int = 8, max_wait: float = 0.005, max_queue: int = 64, timeout: float = 60.0):
        if max_batch < 1 or max_queue < 1 or max_wait < 0 or timeout <= 0:
            raise ValueError("max_batch and max_queue must be >= 1, max_wait >= 0 and timeout > 0")
        self.max_batch, self.max_wait, self.max_queue, self.timeout = max_batch, max_wait, max_queue, timeout
        self.executor = ThreadPoolExecutor(1, thread_name_prefix="blip-model")
        self.waiting: list[Job] = []
        self.coming: Counter = Counter()  # kind -> requests being decoded, soon to be submitted
        self.batches = 0  # batches run, and the requests in them (for /health and the tests)
        self.requests = 0
        self._arrived: asyncio.Event | None = None
        self._task: asyncio.Task | None = None
        self._unique = itertools.count()

    # ------------------------------------------------------------ the request side
    @contextlib.contextmanager
    def preparing(self, kind: str):
        """Around a request's decoding: a batch of `kind` may wait for it (up to max_wait)."""
        self.coming[kind] += 1
        try:
            yield
        finally:
            self.coming[kind] -= 1
            if self._arrived is not None:
                self._arrived.set()

    async def submit(self, fn: Callable[[list], list], payload, key: Hashable = None, grad: bool = False):
        """fn's result for payload. Jobs with an equal (not None) key, a tuple starting with their kind,
        may share one fn call; key=None runs alone. grad=True runs outside inference mode (grounding
        needs gradients)."""
        if self._task is None or self._task.done():
            self._arrived = asyncio.Event()
            self._task = asyncio.get_running_loop().create_task(self._run())
        if len(self.waiting) >= self.max_queue:
            raise QueueFull(f"the server is busy: {len(self.waiting)} requests are waiting; retry later")
        key = ("alone", next(self._unique)) if key is None or self.max_batch == 1 else key
        job = Job(key, fn, payload, grad, asyncio.get_running_loop().create_future())
        self.waiting.append(job)
        self._arrived.set()
        try:  # shield: a timeout drops the job but leaves a running batch alone
            return await asyncio.wait_for(asyncio.shield(job.future), self.timeout)
        except asyncio.TimeoutError:
            job.dropped = True
            if job in self.waiting:
                self.waiting.remove(job)
            raise Timeout(f"the request took longer than {self.timeout:g} s") from None

    # ------------------------------------------------------------ the worker side
    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            while not self.waiting:
                self._arrived.clear()
                await self._arrived.wait()
            batch = await self._gather()
            if not batch:
                continue
            self.batches += 1
            self.requests += len(batch)
            try:
                results = await loop.run_in_executor(self.executor, _call, batch)
            except BaseException as e:  # the whole batch fails alike; the handlers say how
                for job in batch:
                    _settle(job, exception=e)
                if isinstance(e, asyncio.CancelledError):
                    raise
                continue
            for job, result in zip(batch, results):
                _settle(job, result)

    async def _gather(self) -> list[Job]:
        """The oldest job and those waiting with its key, once the batch is full, no more of its kind
        are being decoded, or the oldest has waited max_wait."""
        first = self.waiting[0]
        while True:
            batch = [j for j in self.waiting if j.key == first.key][:self.max_batch]
            left = first.arrived + self.max_wait - time.monotonic()
            if len(batch) >= self.max_batch or left <= 0 or first.dropped or not self.coming[first.key[0]]:
                break
            self._arrived.clear()
            try:
                await asyncio.wait_for(self._arrived.wait(), left)
            except asyncio.TimeoutError:
                pass
        self.waiting = [j for j in self.waiting if j not in batch]
        return [j for j in batch if not j.dropped]

    def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
        self.executor.shutdown(wait=False, cancel_futures=True)


def _settle(job: Job, result=None, exception: BaseException | None = None) -> None:
    if job.future.done():
        return
    # nobody waits for a dropped job: cancel it rather than leave an exception nobody retrieves
    if job.dropped or isinstance(exception, asyncio.CancelledError):
        job.future.cancel()
    elif exception is not None:
        job.future.set_exception(exception)
    else:
        job.future.set_result(result)


def _call(batch: list[Job]) -> list:
    """In the model thread: one fn call for the whole batch."""
    payloads = [job.payload for job in batch]
    if batch[0].grad:
        results = batch[0].fn(payloads)
    else:
        with torch.inference_mode():
            results = batch[0].fn(payloads)
    if len(results) != len(batch):
        raise RuntimeError(f"batch function returned {len(results)} results for {len(batch)} requests")
    return results
