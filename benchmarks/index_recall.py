"""Exact against approximate image search: recall@10 of HNSW and the time per query, by collection size.

    python benchmarks/index_recall.py [--sizes 10000 50000 100000] [--dim 256] [--queries 200]
                                      [--clusters C] [--threads 1] [--json]

Random unit vectors stand in for ITC embeddings: uniform on the sphere (the hardest case for any
approximate index: a nearest neighbour is barely nearer than any other point), or with --clusters
drawn around C centres, closer to how real embeddings bunch up. Queries are answered one at a time,
as `ImageIndex.search` answers them. Recall@10 is the share of the exact top 10 that the approximate
index returns. blip.index.APPROX_MIN, the size from which an index is built as HNSW, is chosen from
these figures (docs/grounding_and_search.md).
"""
from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np


def _unit(rng, n, dim, centres=None):
    """n random unit vectors; with centres, each near a random one of them (cosine ~0.7 to its centre)."""
    x = rng.standard_normal((n, dim), dtype=np.float32)
    if centres is not None:
        x = centres[rng.integers(len(centres), size=n)] + x / np.sqrt(dim)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _per_query(index, queries, k):
    rows, t0 = [], time.perf_counter()
    for q in queries:
        rows.append(index.search(q[None], k)[1][0])
    return np.stack(rows), (time.perf_counter() - t0) / len(queries) * 1e3


def run(sizes, dim=256, n_queries=200, k=10, ef_values=(64, 128, 256), seed=0, clusters=0) -> list[dict]:
    import faiss
    from blip.index import HNSW_EF_CONSTRUCTION, HNSW_M
    rng = np.random.default_rng(seed)
    centres = _unit(rng, clusters, dim) if clusters else None
    queries = _unit(rng, n_queries, dim, centres)
    out = []
    for n in sizes:
        data = _unit(rng, n, dim, centres)
        flat = faiss.IndexFlatIP(dim)
        flat.add(data)
        exact, flat_ms = _per_query(flat, queries, k)
        hnsw = faiss.IndexHNSWFlat(dim, HNSW_M, faiss.METRIC_INNER_PRODUCT)
        hnsw.hnsw.efConstruction = HNSW_EF_CONSTRUCTION
        t0 = time.perf_counter()
        hnsw.add(data)
        build_s = time.perf_counter() - t0
        row = {"size": n, "dim": dim, "clusters": clusters, "flat_ms_per_query": round(flat_ms, 3),
               "hnsw_build_s": round(build_s, 1)}
        for ef in ef_values:
            hnsw.hnsw.efSearch = ef
            approx, ms = _per_query(hnsw, queries, k)
            recall = np.mean([len(set(a) & set(e)) / k for a, e in zip(approx, exact)])
            row[f"hnsw_ef{ef}"] = {"recall@10": round(float(recall), 3), "ms_per_query": round(ms, 3)}
        out.append(row)
        print(json.dumps(row), file=sys.stderr, flush=True)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[10_000, 50_000, 100_000])
    ap.add_argument("--dim", type=int, default=256, help="embedding width (BLIP's ITC: 256)")
    ap.add_argument("--queries", type=int, default=200)
    ap.add_argument("--threads", type=int, default=1, help="faiss OpenMP threads")
    ap.add_argument("--clusters", type=int, default=0,
                    help="draw the vectors around this many random centres (0: uniform on the sphere, the worst case)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    import faiss
    faiss.omp_set_num_threads(args.threads)
    rows = run(args.sizes, args.dim, args.queries, clusters=args.clusters)
    if args.json:
        print(json.dumps({"threads": args.threads, "results": rows}))
        return 0
    for r in rows:
        hnsw = "  ".join(f"{k[5:]} recall {v['recall@10']:.3f} {v['ms_per_query']:.2f} ms"
                         for k, v in r.items() if k.startswith("hnsw_ef"))
        print(f"{r['size']:>9,} x {r['dim']}: flat {r['flat_ms_per_query']:.2f} ms/query; "
              f"hnsw build {r['hnsw_build_s']} s, {hnsw}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
