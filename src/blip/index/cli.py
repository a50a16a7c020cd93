"""`blip index IMAGES... --out DIR` and `blip search DIR QUERY`: the command line of blip.index."""
from __future__ import annotations

import json
import sys


def _load(args, recorded: str | None):
    """--model, else $BLIP_MODEL, else (search) the checkpoint the index was built with."""
    import os
    from ..cli import CliError, _model
    if not (args.model or os.environ.get("BLIP_MODEL")):
        if not recorded:
            raise CliError("no model: pass --model (the index records none it could load)")
        args.model = recorded
    return _model(args, "retrieval")


def cmd_index(args) -> int:
    from . import build_index
    model = _load(args, None)
    index = build_index(model, args.images, args.out, batch_size=args.batch_size, progress=not args.quiet,
                        source=args.model, rebuild=args.rebuild, workers=args.workers)
    counts = index.last_update
    if args.json:
        print(json.dumps({"index": args.out, "images": len(index), "kind": index.kind, **counts}))
    else:
        print(f"{args.out}: {len(index)} images ({index.kind}); added {counts['added']}, updated {counts['updated']}, "
              f"removed {counts['removed']}, kept {counts['kept']}, skipped {counts['skipped']}")
    return 1 if counts["skipped"] else 0


def cmd_search(args) -> int:
    from pathlib import Path
    from ..cli import CliError
    from . import ImageIndex
    if (args.query is None) == (args.image is None):
        raise CliError("give a text query or --image PATH (one of them)")
    index = ImageIndex.open(args.index)
    model = _load(args, index.info.get("model"))
    if args.image is not None and not Path(args.image).is_file():
        raise CliError(f"query image not found: {args.image}")
    query = args.query if args.image is None else Path(args.image)
    hits = index.search(model, query, k=args.k, rerank=args.rerank)
    for rank, h in enumerate(hits, 1):
        if args.json:
            print(json.dumps({"rank": rank, **h}))
        else:
            itm = f"\t{h['itm']:.4f}" if h.get("itm") is not None else ("\t-" if "itm" in h else "")
            print(f"{rank}\t{h['score']:.4f}{itm}\t{h['path']}")
    return 0


def add_cli(subparsers) -> None:
    """Register `index` and `search` on the main CLI's subparsers."""
    from ..cli import _count
    from ..factory import DTYPE_NAMES

    def common(p):
        p.add_argument("--model", "-m", help="retrieval or pretrained checkpoint (default: $BLIP_MODEL; "
                                             "search: else the one the index was built with)")
        p.add_argument("--device", help="cpu, cuda, cuda:1 (default: cuda if available)")
        p.add_argument("--dtype", choices=DTYPE_NAMES, help="precision (default fp32)")
        p.add_argument("--json", action="store_true", help="JSON output")
        p.add_argument("--quiet", action="store_true", help="no progress bar")
        p.set_defaults(task=None)

    p = subparsers.add_parser("index", help="embed images into a searchable index (incremental)",
                              description="ITC image embeddings in a faiss index; run again to add new or changed "
                                          "files and drop vanished ones")
    p.add_argument("images", nargs="+", help="image files and/or folders")
    p.add_argument("--out", "-o", required=True, help="index folder")
    p.add_argument("--batch-size", type=_count(1), default=32)
    p.add_argument("--workers", type=_count(0), default=None, help="image decoding threads")
    p.add_argument("--rebuild", action="store_true", help="start afresh instead of updating")
    common(p)
    p.set_defaults(func=cmd_index)

    p = subparsers.add_parser("search", help="search an image index by text or by image")
    p.add_argument("index", help="index folder (`blip index --out`)")
    p.add_argument("query", nargs="?", help="text query")
    p.add_argument("--image", help="query by this image instead of a text")
    p.add_argument("--k", "-k", type=_count(1), default=10)
    p.add_argument("--rerank", action="store_true", help="re-score the top 2k with the ITM head (text queries)")
    common(p)
    p.set_defaults(func=cmd_search)


if __name__ == "__main__":
    from ..cli import main
    sys.exit(main(sys.argv[1:]))
