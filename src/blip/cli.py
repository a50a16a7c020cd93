"""`blip` command line: caption, match, vqa, embed, convert, info.

Errors are one line on stderr and a non-zero exit (2: nothing could be done; 1: some inputs failed
and were skipped, the rest were processed), never a traceback.
"""
from __future__ import annotations

import argparse
import glob
import json
import logging
import os
import sys
import warnings
from pathlib import Path

from .factory import DTYPE_NAMES

IMAGE_EXTS = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm"}


class CliError(Exception):
    pass


def expand_images(inputs: list[str]) -> list[str]:
    """Files as given; folders walked for image files (sorted); globs expanded."""
    out = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            found = sorted(str(f) for f in p.rglob("*") if f.is_file() and f.suffix.lower() in IMAGE_EXTS)
            if not found:
                print(f"blip: warning: no images in folder {item}", file=sys.stderr)
            out += found
        elif any(c in item for c in "*?[") and not p.exists():
            matches = sorted(glob.glob(item, recursive=True))
            if not matches:
                print(f"blip: warning: no files match {item}", file=sys.stderr)
            out += matches
        else:
            out.append(item)
    return out


def _model(args, task: str):
    import blip
    from blip.config import PRESETS
    name = args.model or os.environ.get("BLIP_MODEL")
    if not name:
        raise CliError("no model: pass --model (a checkpoint path, official name or hub id) or set BLIP_MODEL")
    if name in PRESETS:
        print(f"blip: warning: '{name}' is a preset: random weights, output is meaningless", file=sys.stderr)
        return blip.create_model(name, task=task, device=args.device, dtype=args.dtype)
    model = blip.load(name, task=args.task, device=args.device, dtype=args.dtype)
    if model.config.task == "nlvr" and task != "nlvr":  # the two-image model has none of the others' methods
        raise CliError(f"{name} is an NLVR2 model: use blip evaluate --task nlvr (or model.predict in Python)")
    if task == "nlvr" and model.config.task != "nlvr":
        raise CliError(f"{name} is a '{model.config.task}' model; NLVR2 evaluation needs an NLVR2 checkpoint "
                       "(blip finetune --task nlvr makes one)")
    return model


def _say(line: str) -> None:
    """One whole line on stderr, around the progress bar (cleared and redrawn) and never mixed with a line
    from another thread: Pillow warns from the decoding threads."""
    from tqdm import tqdm
    tqdm.write(line, file=sys.stderr)


def _one_line_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """Library warnings (Pillow's on odd files, say) as one stderr line, without their source line."""
    _say(f"blip: warning: {' '.join(str(message).split())}")


def _batches(paths: list[str], size: int, image_size: int, workers: int | None, progress: bool):
    """Yield lists of (path, normalised image tensor) of `size` readable images; report and skip the
    others. Images decode in `workers` threads, the next batch while the model runs on this one."""
    from blip.transform import ImageError, iter_images
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=len(paths), unit="img", file=sys.stderr)
    batch: list = []
    for i, x in iter_images(paths, image_size, workers=workers, ahead=2 * size):
        if isinstance(x, ImageError):
            _say(f"blip: error: {x}")
        else:
            batch.append((paths[i], x))
        if len(batch) == size:
            yield batch
            batch = []
        if bar:
            bar.update(1)
    if batch:
        yield batch
    if bar:
        bar.close()


def _emit(args, record: dict, text: str) -> None:
    print(json.dumps(record) if args.json else text, flush=True)


def cmd_caption(args) -> int:
    paths = expand_images(args.images)
    if not paths:
        raise CliError("no images given")
    model = _model(args, "caption")
    kw = dict(num_beams=args.num_beams, max_length=args.max_length, min_length=args.min_length,
              sample=args.sample, top_p=args.top_p, repetition_penalty=args.repetition_penalty,
              length_normalization=args.length_normalization)
    if args.prompt is not None:
        kw["prompt"] = args.prompt
    if args.seed is not None:
        import torch
        torch.manual_seed(args.seed)
    done = 0
    for batch in _batches(paths, args.batch_size, model.config.vision.image_size, args.workers,
                          progress=len(paths) > 8 and not args.quiet):
        results = model.caption([img for _, img in batch], batch_size=args.batch_size, return_ids=True, **kw)
        for (path, _), res in zip(batch, results):
            _emit(args, {"image": path, **res}, f"{path}\t{res['caption']}")
            done += 1
    return _finish(done, len(paths))


def _finish(done: int, total: int) -> int:
    failed = total - done
    if done == 0:
        raise CliError(f"none of the {total} images could be read")
    if failed:
        print(f"blip: {failed} of {total} images skipped", file=sys.stderr)
    return 1 if failed else 0


def _one_image(path: str):
    from blip.transform import load_image
    return load_image(path)


def cmd_match(args) -> int:
    model = _model(args, "retrieval")
    image = _one_image(args.image)
    scores = model.match([image], args.text, first_token=args.first_token)
    for i, text in enumerate(args.text):
        itm, itc = float(scores["itm"][i]), float(scores["itc"][i])
        _emit(args, {"image": args.image, "text": text, "itm": itm, "itc": itc},
              f"{itm:.4f}\t{itc:.4f}\t{text}")
    return 0


def cmd_vqa(args) -> int:
    model = _model(args, "vqa")
    image = _one_image(args.image)
    answer_list = None
    if args.answers:
        answer_list = _read_answers(args.answers)
    answers = model.answer([image], args.question, answer_list=answer_list)
    for q, a in zip(args.question, answers):
        _emit(args, {"image": args.image, "question": q, "answer": a}, f"{q}\t{a}")
    return 0


def _read_answers(path: str) -> list[str]:
    p = Path(path)
    if not p.exists():
        raise CliError(f"answer list not found: {path}")
    if p.suffix == ".json":
        data = json.loads(p.read_text())
        if not isinstance(data, list) or not all(isinstance(a, str) for a in data):
            raise CliError(f"{path} must be a JSON list of strings")
        return data
    return [line.strip() for line in p.read_text().splitlines() if line.strip()]


def cmd_embed(args) -> int:
    if not args.images and not args.text:
        raise CliError("give images and/or --text")
    model = _model(args, args.task or "feature")
    done = total = 0
    if args.images:  # each line as soon as its batch is done: a long run shows (and keeps) its progress
        paths = expand_images(args.images)
        total = len(paths)
        for batch in _batches(paths, args.batch_size, model.config.vision.image_size, args.workers,
                              progress=len(paths) > 8 and not args.quiet):
            emb = model.embed_images([img for _, img in batch])
            for (path, _), vec in zip(batch, emb.float().cpu()):
                print(json.dumps({"image": path, "embedding": vec.tolist()}), flush=True)
                done += 1
        if done == 0:
            raise CliError(f"none of the {total} images could be read")
    if args.text:
        emb = model.embed_texts(args.text)
        for text, vec in zip(args.text, emb.float().cpu()):
            print(json.dumps({"text": text, "embedding": vec.tolist()}), flush=True)
    return 1 if done < total else 0


def cmd_convert(args) -> int:
    import blip
    from blip.checkpoint import save_blip, save_hf, save_official
    model = blip.load(args.src, task=args.task, strict=not args.non_strict)
    dst = {"blip": save_blip, "hf": save_hf, "official": save_official}[args.to](model, args.dst)
    print(f"wrote {args.to} checkpoint ({model.config.task}) to {dst}")
    return 0


def cmd_info(args) -> int:
    import blip
    model = blip.load(args.checkpoint, task=args.task, strict=not args.non_strict)
    counts = {}
    for name, p in model.named_parameters():
        counts[name.split(".")[0]] = counts.get(name.split(".")[0], 0) + p.numel()
    info = {"task": model.config.task, "config": model.config.to_dict(),
            "parameters": {**counts, "total": sum(counts.values())}, "notes": model.load_report.notes()}
    if args.json:
        print(json.dumps(info))
    else:
        v, t = model.config.vision, model.config.text
        print(f"task        {model.config.task}")
        print(f"vision      ViT {v.width}w x {v.depth} layers, {v.heads} heads, patch {v.patch_size}, {v.image_size}px")
        print(f"text        {t.width}w x {t.depth} layers, {t.heads} heads, ffn {t.ffn}, vocab {t.vocab_size}"
              + (f" (trimmed: {len(t.vocab_ids)} kept)" if t.vocab_ids is not None else ""))
        if model.config.task == "nlvr":
            from blip.nlvr import merge_from
            print(f"nlvr        two cross-attentions per text layer, one per image: averaged below layer "
                  f"{merge_from(t.depth)}, merged by a Linear from there on; True/False head")
        for part, n in info["parameters"].items():
            print(f"params      {part:<16}{n / 1e6:9.2f}M")
        for note in info["notes"]:
            print(f"note        {note}")
    return 0


def cmd_evaluate(args) -> int:
    from blip import eval as evaluation
    data = args.data or args.annotation
    if not data:
        raise CliError("no annotation file: pass --data FILE")
    if not Path(data).is_file():
        raise CliError(f"annotation file not found: {data}")
    task = args.task
    args.task = None  # the checkpoint says which model it is; blip.eval.<task> says what it needs
    model = _model(args, evaluation.MODEL_TASKS[task])
    options = {"progress": not args.quiet, "out_dir": args.out}
    if args.k_test is not None:
        options["k_test"] = args.k_test
    if args.answers:
        options["answers"] = args.answers
    if args.gt:
        options["gt"] = args.gt
    if args.scorers:
        options["scorers"] = args.scorers.split(",")
    if task == "vqa" and args.inference:
        options["inference"] = args.inference
    metrics = evaluation.evaluate(task, model, data, args.image_root, **options)
    print(json.dumps(metrics) if args.json else "  ".join(
        f"{k} {v:.2f}" if isinstance(v, float) else f"{k} {v}" for k, v in metrics.items()))
    return 0


def _count(least: int):
    """An argparse type: an integer >= least."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
        if value < least:
            raise argparse.ArgumentTypeError(f"must be >= {least}, got {value}")
        return value
    return parse


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="blip", description="BLIP captioning, matching, VQA and embeddings")
    sub = ap.add_subparsers(dest="command", required=True)

    def common(p, task_choices=True):
        p.add_argument("--model", "-m", help="checkpoint: .pth path/URL/official name, folder, or hub id "
                                             "(default: $BLIP_MODEL); a preset name gives random weights")
        if task_choices:
            p.add_argument("--task", choices=["pretrain", "caption", "retrieval", "vqa", "feature"],
                           help="model to build when it differs from the checkpoint's")
        p.add_argument("--device", help="cpu, cuda, cuda:1 (default: cuda if available)")
        p.add_argument("--dtype", choices=DTYPE_NAMES,
                       help="precision: bf16 = image encoder in bf16, text side fp32 (captions match fp32); "
                            "bf16-full = every weight in bf16 (fastest, near-tie tokens may differ)")
        p.add_argument("--json", action="store_true", help="one JSON object per line")
        p.add_argument("--quiet", action="store_true", help="no progress bar")

    def batching(p):
        p.add_argument("--batch-size", type=_count(1), default=16)
        p.add_argument("--workers", type=_count(0), default=None,
                       help="threads decoding images ahead of the model (default: up to 8; 0: none)")

    p = sub.add_parser("caption", help="caption images")
    p.add_argument("images", nargs="+", help="image files, folders or globs")
    common(p)
    p.add_argument("--num-beams", type=int, default=3)
    p.add_argument("--max-length", type=int, default=20, help="max tokens, prompt included (official)")
    p.add_argument("--min-length", type=int, default=5, help="min tokens, prompt included (official)")
    p.add_argument("--sample", action="store_true", help="nucleus sampling instead of beam search")
    p.add_argument("--top-p", type=float, default=0.9)
    p.add_argument("--repetition-penalty", type=float, help="default 1.0 (beam), 1.1 (sampling)")
    p.add_argument("--prompt", help="decoder prompt (default 'a picture of ')")
    p.add_argument("--length-normalization", choices=["full", "generated"], default="full",
                   help="beam scores over the whole sequence (official) or generated tokens (transformers)")
    batching(p)
    p.add_argument("--seed", type=int, help="random seed for --sample")
    p.set_defaults(func=cmd_caption)

    p = sub.add_parser("match", help="image-text matching scores (ITM probability, ITC cosine)")
    p.add_argument("image")
    p.add_argument("--text", "-t", nargs="+", required=True)
    p.add_argument("--first-token", choices=["enc", "cls"], default="enc",
                   help="[ENC] as in official training/retrieval, or [CLS] as the official demo/transformers")
    common(p)
    p.set_defaults(func=cmd_match)

    p = sub.add_parser("vqa", help="answer questions about an image")
    p.add_argument("image")
    p.add_argument("--question", "-q", nargs="+", required=True)
    p.add_argument("--answers", help="answer list (JSON list or one per line) to rank instead of generating")
    common(p)
    p.set_defaults(func=cmd_vqa)

    p = sub.add_parser("embed", help="image and/or text embeddings as JSON lines")
    p.add_argument("images", nargs="*")
    p.add_argument("--text", "-t", nargs="+")
    batching(p)
    common(p)
    p.set_defaults(func=cmd_embed)

    p = sub.add_parser("evaluate", help="finetuned-task metrics on an official-format annotation file",
                       description="captioning: BLEU/METEOR/ROUGE-L/CIDEr (pycocoevalcap); retrieval: TR/IR@1/5/10 "
                                   "with the ITM rerank; vqa: VQA accuracy and the submission JSON; nlvr: accuracy")
    p.add_argument("annotation", nargs="?", help="annotation file (same as --data)")
    p.add_argument("--task", choices=["caption", "retrieval", "vqa", "nlvr"], default="retrieval")
    p.add_argument("--data", help="annotation file: coco_karpathy_test.json, flickr30k_test.json, vqa_test.json, "
                                  "nlvr_test.json, or a JSON list of {image, caption}")
    p.add_argument("--image-root", help="folder image paths are relative to (default: the JSON's folder)")
    p.add_argument("--k-test", type=_count(0), default=None,
                   help="retrieval: ITM-rerank the top k (official 256 COCO / 128 Flickr; 0: ITC only); "
                        "vqa: candidates ranked (128)")
    p.add_argument("--answers", help="vqa: answer list to rank (answer_list.json); without it, answers are generated")
    p.add_argument("--inference", choices=["rank", "generate"], help="vqa: rank over --answers (official) or generate")
    p.add_argument("--gt", help="caption: COCO-format reference file (default: the references in the data file)")
    p.add_argument("--scorers", help="caption: comma-separated subset of bleu,meteor,rouge,cider,spice (default: all; "
                                     "SPICE only when its CoreNLP models are installed)")
    p.add_argument("--out", help="folder for the results file (captions / VQA submission JSON)")
    common(p, task_choices=False)
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("convert", help="convert a checkpoint between formats")
    p.add_argument("src")
    p.add_argument("dst")
    p.add_argument("--to", choices=["blip", "hf", "official"], default="blip")
    p.add_argument("--task", choices=["pretrain", "caption", "retrieval", "vqa", "feature"])
    p.add_argument("--non-strict", action="store_true", help="load despite missing/unexpected keys")
    p.set_defaults(func=cmd_convert)

    from blip.data.synth import add_cli as add_data_cli
    add_data_cli(sub)
    from blip.reproduce.cli import add_cli as add_reproduce_cli
    add_reproduce_cli(sub)
    from blip.grounding import add_cli as add_ground_cli
    add_ground_cli(sub)
    from blip.index.cli import add_cli as add_index_cli
    add_index_cli(sub)
    from blip.serve.cli import add_cli as add_serve_cli
    add_serve_cli(sub)
    from blip.capfilt.cli import add_cli as add_capfilt_cli
    add_capfilt_cli(sub)
    try:
        from blip.train.cli import add_cli as add_train_cli
    except ImportError:  # the training package is optional at import time
        add_train_cli = None
    if add_train_cli:
        add_train_cli(sub)

    p = sub.add_parser("info", help="describe a checkpoint")
    p.add_argument("checkpoint")
    p.add_argument("--task", choices=["pretrain", "caption", "retrieval", "vqa", "feature", "nlvr"])
    p.add_argument("--json", action="store_true")
    p.add_argument("--non-strict", action="store_true")
    p.set_defaults(func=cmd_info)
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="blip: %(message)s")
    warnings.showwarning = _one_line_warning
    if hasattr(sys.stdout, "reconfigure"):  # file names that are not UTF-8 print as their own bytes, as ls does
        sys.stdout.reconfigure(errors="surrogateescape")
    try:
        return args.func(args)
    except KeyboardInterrupt:
        return 130
    except (CliError, ValueError, OSError, RuntimeError) as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        print(f"blip: error: {msg}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
