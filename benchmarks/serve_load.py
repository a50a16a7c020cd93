"""Load on `blip serve`: N concurrent clients for T seconds against a server on loopback, once with
micro-batching and once with it off (--max-batch 1), same model, same requests.

Prints (and writes benchmarks/results/serve_load.json) throughput, p50/p99 latency, errors (should be 0),
the server's RSS before and after the load (memory stable), the mean batch size, and the batching gain
(throughput batched / unbatched).

    python benchmarks/serve_load.py [--model tiny] [--endpoint caption|match|embed] [--clients 16]
                                    [--seconds 10] [--max-batch 8] [--max-wait-ms 5] [--device cpu]
"""
from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
from PIL import Image


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def images(n: int = 8, side: int = 96) -> list[bytes]:
    rng = np.random.default_rng(0)
    out = []
    for _ in range(n):
        img = Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8))
        buf = io.BytesIO()
        img.save(buf, "JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def start(args, max_batch: int, port: int) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "blip.cli", "serve", "--model", args.model, "--port", str(port),
           "--max-batch", str(max_batch), "--max-wait-ms", str(args.max_wait_ms), "--queue-size", "1024",
           "--log-level", "warning"]
    if args.endpoint != "caption":
        cmd += ["--retrieval", args.retrieval or ("tiny" if args.model == "tiny" else args.model)]
    if args.device:
        cmd += ["--device", args.device]
    proc = subprocess.Popen(cmd, stderr=subprocess.DEVNULL, env={**os.environ, "OMP_NUM_THREADS": str(args.threads)})
    deadline = time.monotonic() + 120
    while True:
        try:
            httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).raise_for_status()
            return proc
        except httpx.HTTPError:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"server did not start: {' '.join(cmd)}")
            time.sleep(0.3)


def form(args, i: int, pics: list[bytes]):
    files = {"image": ("x.jpg", pics[i % len(pics)], "image/jpeg")}
    if args.endpoint == "match":
        return files, {"text": ["a red circle above a blue square", "a dog", "two green triangles"]}
    if args.endpoint == "embed":
        return files, {"text": "a red circle above a blue square"}
    return files, {}


async def load(args, url: str, seconds: float, pics: list[bytes]) -> dict:
    lat, errors = [], 0
    limits = httpx.Limits(max_connections=args.clients, max_keepalive_connections=args.clients)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=120) as client:
        stop = time.monotonic() + seconds

        async def one_client(c: int) -> None:
            nonlocal errors
            i = c
            while time.monotonic() < stop:
                files, data = form(args, i, pics)
                t0 = time.perf_counter()
                try:
                    r = await client.post("/" + args.endpoint, files=files, data=data)
                    ok = r.status_code == 200
                except httpx.HTTPError:
                    ok = False
                if ok:
                    lat.append(time.perf_counter() - t0)
                else:
                    errors += 1
                i += args.clients
        t0 = time.perf_counter()
        await asyncio.gather(*(one_client(c) for c in range(args.clients)))
        wall = time.perf_counter() - t0
    lat.sort()
    pick = lambda q: lat[min(len(lat) - 1, int(q * len(lat)))] * 1e3 if lat else None  # noqa: E731
    return {"requests": len(lat), "errors": errors, "throughput_rps": round(len(lat) / wall, 2),
            "p50_ms": round(pick(0.5), 1) if lat else None, "p99_ms": round(pick(0.99), 1) if lat else None,
            "mean_ms": round(statistics.fmean(lat) * 1e3, 1) if lat else None}


def run(args, max_batch: int, pics: list[bytes]) -> dict:
    port = free_port()
    proc = start(args, max_batch, port)
    url = f"http://127.0.0.1:{port}"
    try:
        asyncio.run(load(args, url, args.warmup, pics))  # first calls allocate; RSS is read after them
        before = rss_mb(proc.pid)
        h0 = httpx.get(url + "/health").json()["batching"]
        result = asyncio.run(load(args, url, args.seconds, pics))
        h1 = httpx.get(url + "/health").json()["batching"]
        after = rss_mb(proc.pid)
    finally:
        proc.terminate()
        proc.wait(30)
    batches = h1["batches"] - h0["batches"]
    return {"max_batch": max_batch, **result, "mean_batch": round((h1["requests"] - h0["requests"]) / max(1, batches), 2),
            "rss_mb_before": round(before, 1), "rss_mb_after": round(after, 1)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="tiny", help="checkpoint or preset (random weights) for --model")
    ap.add_argument("--retrieval", help="checkpoint for match/embed (default: the tiny preset, or --model)")
    ap.add_argument("--endpoint", choices=["caption", "match", "embed"], default="caption")
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--warmup", type=float, default=2.0)
    ap.add_argument("--max-batch", type=int, default=8)
    ap.add_argument("--max-wait-ms", type=float, default=5.0)
    ap.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS of the server")
    ap.add_argument("--device")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "serve_load.json"))
    args = ap.parse_args()
    pics = images()
    batched = run(args, args.max_batch, pics)
    single = run(args, 1, pics)
    report = {"endpoint": args.endpoint, "model": args.model, "clients": args.clients, "seconds": args.seconds,
              "server_threads": args.threads, "command": " ".join(["python", *sys.argv]),
              "batched": batched, "unbatched": single,
              "batching_gain": round(batched["throughput_rps"] / max(single["throughput_rps"], 1e-9), 2)}
    print(json.dumps(report, indent=2))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
