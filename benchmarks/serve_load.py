"""Load on `blip serve`: N concurrent clients for T seconds against a server on loopback, with
micro-batching and with it off (--max-batch 1), same model, same requests; --rounds pairs, the order
swapped every other round (this VM's speed drifts within minutes).

Prints (and writes benchmarks/results/serve_load.json) throughput, p50/p99 latency, errors (should be 0),
the server's RSS before and after the load (memory stable), the mean batch size, and the batching gain
(the median over rounds of throughput batched / unbatched).

    python benchmarks/serve_load.py [--model tiny] [--endpoint caption|match|embed] [--clients 16]
                                    [--seconds 10] [--rounds 2] [--max-batch 8] [--max-wait-ms 5] [--device cpu]
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
    return {"latencies": lat, "errors": errors, "wall": wall}


def summary(lat: list[float]) -> dict:
    lat = sorted(lat)
    pick = lambda q: round(lat[min(len(lat) - 1, int(q * len(lat)))] * 1e3, 1) if lat else None  # noqa: E731
    return {"p50_ms": pick(0.5), "p99_ms": pick(0.99),
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
    return {**result, "throughput_rps": len(result["latencies"]) / result["wall"],
            "mean_batch": (h1["requests"] - h0["requests"]) / max(1, batches),
            "rss_mb_before": round(before, 1), "rss_mb_after": round(after, 1)}


def combine(runs: list[dict], max_batch: int) -> dict:
    lat = [x for r in runs for x in r["latencies"]]
    return {"max_batch": max_batch, "requests": len(lat), "errors": sum(r["errors"] for r in runs),
            "throughput_rps": round(statistics.median(r["throughput_rps"] for r in runs), 2),
            "throughput_rps_rounds": [round(r["throughput_rps"], 2) for r in runs], **summary(lat),
            "mean_batch": round(statistics.fmean(r["mean_batch"] for r in runs), 2),
            "rss_mb_before": [r["rss_mb_before"] for r in runs], "rss_mb_after": [r["rss_mb_after"] for r in runs]}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="tiny", help="checkpoint or preset (random weights) for --model")
    ap.add_argument("--retrieval", help="checkpoint for match/embed (default: the tiny preset, or --model)")
    ap.add_argument("--endpoint", choices=["caption", "match", "embed"], default="caption")
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--warmup", type=float, default=2.0)
    ap.add_argument("--rounds", type=int, default=2,
                    help="pairs of runs (batched, unbatched), the order swapped each round")
    ap.add_argument("--max-batch", type=int, default=8)
    ap.add_argument("--max-wait-ms", type=float, default=5.0)
    ap.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS of the server")
    ap.add_argument("--device")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "serve_load.json"))
    args = ap.parse_args()
    pics = images()
    runs = {args.max_batch: [], 1: []}
    for r in range(args.rounds):
        for mb in ((args.max_batch, 1) if r % 2 == 0 else (1, args.max_batch)):
            runs[mb].append(run(args, mb, pics))
    gains = [b["throughput_rps"] / max(u["throughput_rps"], 1e-9) for b, u in zip(runs[args.max_batch], runs[1])]
    report = {"endpoint": args.endpoint, "model": args.model, "clients": args.clients, "seconds": args.seconds,
              "rounds": args.rounds, "max_wait_ms": args.max_wait_ms, "server_threads": args.threads,
              "command": " ".join(["python", *sys.argv]),
              "batched": combine(runs[args.max_batch], args.max_batch), "unbatched": combine(runs[1], 1),
              "batching_gain": round(statistics.median(gains), 2), "batching_gain_rounds": [round(g, 2) for g in gains]}
    print(json.dumps(report, indent=2))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
