"""CapFilt (paper §3.3): caption every web image, filter the web and synthetic texts, keep the matches.

Read top to bottom:
  1. options and models (which checkpoint kind each role needs)
  2. the two model steps: synthetic_captions (seeded per image) and filter_scores
  3. one part: decode, caption, score, write its output shard and its audit rows atomically
  4. the run folder: manifest, parts done, assembly of the final outputs
  5. bootstrap(), the entry point

Why the run is a folder of parts: a web corpus takes GPU-days, so a run must survive being killed at
any moment and continue where it stopped, and ranks (one per GPU, on one or many machines) must
share it without talking to each other. Each part is a pure function of (input slice, arguments):
its captions draw from generators seeded by (seed, image key, k) and its batches start at the
part's start, so a resumed or distributed run writes the bytes an uninterrupted one writes.
"""
from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import shutil
import sys
import tarfile
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
import torch.nn.functional as F

from .. import factory
from ..generation import GenerationConfig
from ..model import _NEEDS, Blip, MissingPartError
from ..tokenizer import ENC_ID, pre_caption
from .source import NO_LABEL, Part, Source, decoded

log = logging.getLogger("blip.capfilt")
FINAL = ("audit.parquet", "bootstrapped.json", "summary.json")
VERSION = 1


# -----------------------------------------------------------------------------
# 1. options and models

@dataclass
class Options:
    num_captions: int = 1        # synthetic captions per web image (the paper: 1)
    num_beams: int = 0           # 0: nucleus sampling (the paper's choice); N: beam search with N beams
    top_p: float = 0.9
    top_k: int = 50              # transformers 4.15 applied its default top-k 50 before top-p
    repetition_penalty: float | None = None  # None: 1.1 when sampling (official), 1.0 for beams
    max_length: int = 20         # tokens, prompt included (official caption config / demo)
    min_length: int = 5
    prompt: str | None = None    # None: the captioner's ("a picture of ")
    threshold: float = 0.5       # keep a text when P(match) >= threshold (the maintainer's 0.5)
    seed: int = 0
    batch_size: int = 16
    part_size: int = 1000        # JSON items per part (a shard is one part)
    image_root: str | None = None
    device: str | None = None
    dtype: str | None = None     # default: "bf16" on CUDA (image encoders bf16, text fp32), else fp32
    workers: int | None = None
    progress: bool = False
    force: bool = False
    rank: int | None = None      # default: $RANK / $WORLD_SIZE (torchrun), else 0 / 1
    world_size: int | None = None

    def check(self) -> None:
        if not isinstance(self.num_captions, int) or self.num_captions < 1:
            raise ValueError(f"num_captions must be a positive integer, got {self.num_captions!r}")
        if self.num_beams and self.num_captions > 1:
            raise ValueError("beam search gives one caption per image: use num_captions=1, or sampling")
        if not 0.0 <= self.threshold <= 1.0:
            raise ValueError(f"threshold is a probability in [0, 1], got {self.threshold!r}")
        if not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {self.batch_size!r}")
        GenerationConfig(**self.generation()).validate()

    def generation(self) -> dict:
        sample = not self.num_beams
        rep = self.repetition_penalty if self.repetition_penalty is not None else (1.1 if sample else 1.0)
        return dict(num_beams=self.num_beams or 1, max_length=self.max_length, min_length=self.min_length,
                    do_sample=sample, top_p=self.top_p, top_k=self.top_k, repetition_penalty=rep)


_ROLES = {  # role -> (the _NEEDS entry naming the checkpoint kind, whether a model can play it)
    "captioner": ("caption", lambda m: m.has("text_decoder") and m.config.task != "vqa"),
    "filter": ("match", lambda m: m.has("text_encoder", "itm_head", "vision_proj", "text_proj")),
}


def load_role(spec, role: str, device, dtype) -> Blip:
    """The model for a role, or a MissingPartError naming the checkpoint kind the role needs."""
    need, fits = _ROLES[role]
    model = spec if isinstance(spec, Blip) else factory.load(spec, device=device, dtype=dtype)
    if not fits(model):
        kind = _NEEDS[need][1]
        name = "the model given" if isinstance(spec, Blip) else os.fspath(spec)
        raise MissingPartError(f"the {role} needs {kind}; {name} is a '{model.config.task}' checkpoint")
    return model


def _identity(spec) -> str:
    """What the manifest records for a model: the name or path given, or a fingerprint of a Blip object."""
    if not isinstance(spec, Blip):
        return os.fspath(spec)
    h = hashlib.sha1(json.dumps(spec.config.to_dict(), sort_keys=True).encode())
    for t in spec.state_dict().values():
        h.update(t.detach().flatten()[:64].float().cpu().numpy().tobytes())
    return f"<Blip {spec.config.task} {h.hexdigest()[:16]}>"


# -----------------------------------------------------------------------------
# 2. the model steps

def caption_seed(seed: int, key: str, k: int) -> int:
    """The seed of image `key`'s k-th synthetic caption: a function of the image alone, not of its batch,
    part, rank or of how often the run was restarted."""
    digest = hashlib.blake2b(f"{seed}\x00{key}\x00{k}".encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


@torch.inference_mode()
def synthetic_captions(model: Blip, images, keys: list[str], opts: Options) -> list[list[str]]:
    """opts.num_captions captions per image (normalised tensor batch), each sampled from its own generator."""
    k, gen = opts.num_captions, opts.generation()
    gens = None
    if gen["do_sample"]:
        gens = [torch.Generator(device=model.device).manual_seed(caption_seed(opts.seed, key, j))
                for key in keys for j in range(k)]
    ids, plen = model.generate_ids(images, prompt=opts.prompt, num_beams=gen["num_beams"], sample=gen["do_sample"],
                                   max_length=gen["max_length"], min_length=gen["min_length"], top_p=gen["top_p"],
                                   top_k=gen["top_k"], repetition_penalty=gen["repetition_penalty"], generator=gens,
                                   num_return_sequences=k)
    texts = [model.tokenizer.decode(row[plen:]) for row in ids]
    return [texts[i * k:(i + 1) * k] for i in range(len(keys))]


@torch.inference_mode()
def filter_scores(model: Blip, images, texts: list[list[str]]) -> tuple[torch.Tensor, torch.Tensor]:
    """(ITM probability, ITC cosine), each (B, T), of image i with each of its T texts: the ITM head's softmax
    with [ENC] first (official training and retrieval), as Blip.match computes them. The rows of one image
    are grouped, so the text encoder projects that image's cross-attention keys/values once for all of them."""
    b, t = len(texts), len(texts[0])
    states = model.encode_image(images)
    ids, mask = model._texts([x for row in texts for x in row], 35, None)
    img = F.normalize(model.vision_proj(states[:, 0]).float(), dim=-1)  # Blip.itc_similarity, row by row
    txt = F.normalize(model.text_proj(model.text_encoder(ids, mask, mode="text")[:, 0]).float(), dim=-1)
    itc = (img.repeat_interleave(t, dim=0) * txt).sum(-1).view(b, t)
    enc = ids.clone()
    enc[:, 0] = ENC_ID
    itm = model.itm_logits(states, enc, mask).float().softmax(-1)[:, 1].view(b, t)
    return itm, itc


# -----------------------------------------------------------------------------
# 3. one part

def _schema():
    import pyarrow as pa
    return pa.schema([("key", pa.string()), ("image", pa.string()), ("text", pa.string()), ("source", pa.string()),
                      ("itm", pa.float32()), ("itc", pa.float32()), ("kept", pa.bool_()), ("noise", pa.bool_()),
                      ("noise_kind", pa.string())])


class _TarOut:
    """A tar written member by member in the order given, with fixed metadata (same members, same bytes)."""

    def __init__(self, path: Path):
        self.file = open(path, "wb")
        self.tar = tarfile.open(fileobj=self.file, mode="w", format=tarfile.PAX_FORMAT)

    def add(self, name: str, data: bytes) -> None:
        info = tarfile.TarInfo(name)
        info.size, info.mtime, info.mode, info.uid, info.gid, info.uname, info.gname = len(data), 0, 0o644, 0, 0, "", ""
        self.tar.addfile(info, io.BytesIO(data))

    def close(self) -> None:
        self.tar.close()
        self.file.flush()
        os.fsync(self.file.fileno())
        self.file.close()


def _label(noise):
    """(noisy, kind) from an input noise label: None/False/"" mean a clean pair, a string names the noise."""
    if noise is NO_LABEL:
        return None, None
    return bool(noise), (noise if isinstance(noise, str) and noise else None)


def _web_text(caption) -> str | None:
    return caption if isinstance(caption, str) and pre_caption(caption) else None


def _score(models, opts: Options, batch, rows: dict, tar: _TarOut) -> None:
    """Caption and filter one batch of decoded items; append audit rows and write the kept samples."""
    cap, flt = models
    items = [item for item, _ in batch]
    px_cap = torch.stack([t[cap.config.vision.image_size] for _, (_, t) in batch])
    px_flt = torch.stack([t[flt.config.vision.image_size] for _, (_, t) in batch])
    synthetic = synthetic_captions(cap, px_cap, [it.key for it in items], opts)
    texts = [[_web_text(it.caption) or ""] + syn for it, syn in zip(items, synthetic)]
    itm, itc = (s.float().cpu().tolist() for s in filter_scores(flt, px_flt, texts))
    for i, ((item, (data, _)), row_texts) in enumerate(zip(batch, texts)):
        noisy, kind = _label(item.noise)
        for j, text in enumerate(row_texts):
            if j == 0 and _web_text(item.caption) is None:
                continue  # no usable web text: only its synthetic captions are scored
            source = "web" if j == 0 else "synthetic"
            kept = itm[i][j] >= opts.threshold
            for col, v in (("key", item.key), ("image", item.image), ("text", text), ("source", source),
                           ("itm", itm[i][j]), ("itc", itc[i][j]), ("kept", kept),
                           ("noise", noisy if j == 0 else None), ("noise_kind", kind if j == 0 else None)):
                rows[col].append(v)
            if kept:
                name = f"{item.key}_{j}"
                meta = {"key": name, "web_key": item.key, "image": item.image, "caption": text, "source": source,
                        "itm": itm[i][j], "itc": itc[i][j]}
                tar.add(f"{name}.{item.ext}", data)
                tar.add(f"{name}.txt", text.encode("utf-8"))
                tar.add(f"{name}.json", json.dumps(meta, ensure_ascii=False).encode("utf-8"))


def process_part(part: Part, source: Source, models, opts: Options, run: "RunFolder", bar=None) -> dict:
    """Write the part's output shard, then its audit rows (whose file marks the part done)."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    t0 = time.perf_counter()
    sizes = tuple(sorted({m.config.vision.image_size for m in models}))
    rows = {f.name: [] for f in _schema()}
    stats = {"part": part.index, "source": part.source, "items": 0, "images": 0, "unreadable": 0,
             "web_missing": 0}
    pause = float(os.environ.get("BLIP_CAPFILT_PAUSE", "0") or 0)  # test hook: a slow run to kill mid-part
    tar_tmp = _tmp(run.shard_path(part))
    tar = _TarOut(tar_tmp)
    batch = []

    def flush():
        _score(models, opts, batch, rows, tar)
        stats["images"] += len(batch)
        batch.clear()
        if pause:
            time.sleep(pause)

    for item, got in decoded(source.read(part), sizes, workers=opts.workers, ahead=2 * opts.batch_size):
        stats["items"] += 1
        if bar is not None:
            bar.update(1)
        if isinstance(got, Exception):
            stats["unreadable"] += 1
            if stats["unreadable"] <= 10:
                log.warning("skipping %s: %s", item.key, got)
            continue
        stats["web_missing"] += _web_text(item.caption) is None
        batch.append((item, got))
        if len(batch) == opts.batch_size:
            flush()
    if batch:
        flush()
    tar.close()
    os.replace(tar_tmp, run.shard_path(part))
    stats["seconds"] = time.perf_counter() - t0
    table = pa.table(rows, schema=_schema()).replace_schema_metadata({"blip.capfilt.part": json.dumps(stats)})
    tmp = _tmp(run.part_path(part))
    pq.write_table(table, tmp)
    os.replace(tmp, run.part_path(part))
    return stats


# -----------------------------------------------------------------------------
# 4. the run folder

def _tmp(path: Path) -> Path:
    """A temporary name beside `path`, private to this process (ranks write the same manifest at once)."""
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


def _is_tmp_of(name: str, path: Path) -> bool:
    """Whether `name` is a `_tmp(path)` of some process."""
    return name.startswith(f".{path.name}.") and name.endswith(".tmp")


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = _tmp(path)
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class RunFolder:
    """DIR/manifest.json (the arguments and the parts), DIR/parts/part-NNNNN.parquet (a finished part's audit
    rows and statistics), DIR/shards/bootstrapped-NNNNN.tar (its kept pairs), then the assembled outputs."""

    def __init__(self, out_dir, manifest: dict, rank: int, force: bool):
        self.dir = Path(out_dir)
        self.parts_dir, self.shards_dir = self.dir / "parts", self.dir / "shards"
        self.manifest = manifest
        text = (json.dumps(manifest, indent=2, sort_keys=True) + "\n").encode("utf-8")
        path = self.dir / "manifest.json"
        if self.dir.exists() and not self.dir.is_dir():
            raise ValueError(f"--out {self.dir} exists and is not a folder")
        # another rank may have made the subfolders, or be writing the manifest, before this one looks
        own = (self.parts_dir.name, self.shards_dir.name)
        if self.dir.exists() and not path.exists() and any(
                e.name not in own and not _is_tmp_of(e.name, path) for e in self.dir.iterdir()):
            raise ValueError(f"--out {self.dir} is not empty and holds no capfilt run (manifest.json); pick another")
        started = time.time_ns()
        if force and rank == 0:
            for sub in (self.parts_dir, self.shards_dir):
                shutil.rmtree(sub, ignore_errors=True)
            for name in (*FINAL, "manifest.json"):
                (self.dir / name).unlink(missing_ok=True)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.parts_dir.mkdir(exist_ok=True)
        self.shards_dir.mkdir(exist_ok=True)
        if force and rank != 0:  # rank 0 starts the run over: wait for its new manifest
            _wait(lambda: path.exists() and path.read_bytes() == text and path.stat().st_mtime_ns >= started - 10**9,
                  f"rank 0 to restart the run in {self.dir}", timeout=600)
        elif not path.exists():
            _atomic_write(path, text)  # every rank writes the same bytes: a race is harmless
        elif path.read_bytes() != text:
            try:
                old = json.loads(path.read_text(encoding="utf-8"))
            except ValueError:
                old = {}
            differ = [k for k in sorted(set(old.get("args", {})) | set(manifest["args"]))
                      if old.get("args", {}).get(k) != manifest["args"].get(k)]
            if old.get("parts") != manifest["parts"]:
                differ.append("the input's parts")
            raise ValueError(f"{self.dir} holds a run with other arguments (differs in: "
                             f"{', '.join(differ) or 'version'}); "
                             "rerun the same command to continue, pick another --out, or pass --force to start over")

    def part_path(self, part: Part) -> Path:
        return self.parts_dir / f"part-{part.index:05d}.parquet"

    def shard_path(self, part: Part) -> Path:
        return self.shards_dir / f"bootstrapped-{part.index:05d}.tar"

    def done(self, part: Part) -> bool:
        return self.part_path(part).exists() and self.shard_path(part).exists()

    def assemble(self, parts: list[Part], opts: Options) -> dict:
        """The final outputs from the parts, in part order (deterministic: same parts, same bytes)."""
        import pyarrow.parquet as pq
        counts = _Counts()
        writer_tmp = _tmp(self.dir / "audit.parquet")
        writer = pq.ParquetWriter(writer_tmp, _schema())
        json_tmp = _tmp(self.dir / "bootstrapped.json")
        with open(json_tmp, "w", encoding="utf-8") as out:
            out.write("[")
            first = True
            for part in parts:
                pf = pq.ParquetFile(self.part_path(part))
                counts.part(json.loads(pf.schema_arrow.metadata[b"blip.capfilt.part"]))
                table = pf.read().replace_schema_metadata(None)
                writer.write_table(table)
                cols = table.to_pydict()
                counts.rows(cols)
                for image, text, kept in zip(cols["image"], cols["text"], cols["kept"]):
                    if kept:
                        out.write(("" if first else ",") + json.dumps({"image": image, "caption": text},
                                                                      ensure_ascii=False, separators=(",", ":")))
                        first = False
            out.write("]\n")
            out.flush()
            os.fsync(out.fileno())
        writer.close()
        os.replace(writer_tmp, self.dir / "audit.parquet")
        os.replace(json_tmp, self.dir / "bootstrapped.json")
        summary = counts.summary(self.manifest)
        _atomic_write(self.dir / "summary.json", (json.dumps(summary, indent=2) + "\n").encode("utf-8"))
        for stale in (*self.dir.glob(".*.tmp"), *self.parts_dir.glob(".*.tmp"), *self.shards_dir.glob(".*.tmp")):
            stale.unlink(missing_ok=True)  # left by a run killed mid-write
        return summary


def _wait(ready, what: str, timeout: float | None = None, poll: float = 0.5) -> None:
    start = time.monotonic()
    said = False
    while not ready():
        if timeout is not None and time.monotonic() - start > timeout:
            raise RuntimeError(f"gave up waiting for {what} after {timeout:.0f} s")
        if not said and time.monotonic() - start > 5:
            print(f"blip: waiting for {what}", file=sys.stderr)
            said = True
        time.sleep(poll)


class _Counts:
    """What summary.json reports, accumulated part by part."""

    def __init__(self):
        self.images = self.items = self.unreadable = self.web_missing = 0
        self.seconds = 0.0
        self.parts = 0
        self.texts = {s: {"total": 0, "kept": 0} for s in ("web", "synthetic")}
        self.labelled = {"total": 0, "noisy": 0, "kept": 0, "kept_noisy": 0}
        self.kinds: dict[str, dict] = {}

    def part(self, stats: dict) -> None:
        self.parts += 1
        self.images += stats["images"]
        self.items += stats["items"]
        self.unreadable += stats["unreadable"]
        self.web_missing += stats["web_missing"]
        self.seconds += stats["seconds"]

    def rows(self, cols: dict) -> None:
        for source, kept, noisy, kind in zip(cols["source"], cols["kept"], cols["noise"], cols["noise_kind"]):
            self.texts[source]["total"] += 1
            self.texts[source]["kept"] += kept
            if noisy is not None:
                lab = self.labelled
                lab["total"] += 1
                lab["noisy"] += noisy
                lab["kept"] += kept
                lab["kept_noisy"] += noisy and kept
                if noisy:
                    k = self.kinds.setdefault(kind or "noisy", {"web_texts": 0, "kept": 0})
                    k["web_texts"] += 1
                    k["kept"] += kept

    def summary(self, manifest: dict) -> dict:
        frac = lambda a, b: a / b if b else None  # noqa: E731
        texts = {s: {**c, "kept_fraction": frac(c["kept"], c["total"]),
                     "filtered_fraction": frac(c["total"] - c["kept"], c["total"])} for s, c in self.texts.items()}
        out = {"items": self.items, "images": self.images, "unreadable_images": self.unreadable,
               "web_texts_missing": self.web_missing, "texts": texts,
               "bootstrapped_pairs": sum(c["kept"] for c in self.texts.values())}
        lab = self.labelled
        if lab["total"]:
            out["noise"] = {"labelled_web_texts": lab["total"], "noisy_before": lab["noisy"],
                            "noise_ratio_before": frac(lab["noisy"], lab["total"]),
                            "kept_labelled_web_texts": lab["kept"], "noisy_after": lab["kept_noisy"],
                            "noise_ratio_after": frac(lab["kept_noisy"], lab["kept"]),
                            "kept_fraction_by_kind": {k: frac(v["kept"], v["web_texts"])
                                                      for k, v in sorted(self.kinds.items())}}
        out["args"] = manifest["args"]
        # wall-clock measurements: the one entry that differs between runs of the same command
        out["speed"] = {"images_per_s": frac(self.images, self.seconds), "compute_seconds": self.seconds,
                        "parts": self.parts}
        return out


# -----------------------------------------------------------------------------
# 5. entry point

def _rank_world(opts: Options) -> tuple[int, int]:
    rank = opts.rank if opts.rank is not None else int(os.environ.get("RANK", 0))
    world = opts.world_size if opts.world_size is not None else int(os.environ.get("WORLD_SIZE", 1))
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"rank must be in [0, world_size), got rank={rank} world_size={world}")
    return rank, world


def _device(opts: Options) -> torch.device:
    dev = factory.default_device(opts.device)
    if dev.type == "cuda" and dev.index is None and "LOCAL_RANK" in os.environ:  # torchrun: one GPU a rank
        dev = factory.default_device(f"cuda:{int(os.environ['LOCAL_RANK'])}")
    return dev


def bootstrap(captioner, filter, items_or_source, out_dir, **options) -> dict:
    """Run CapFilt over web pairs into out_dir; return the summary (rank 0) or this rank's part statistics.

    captioner: a checkpoint with a captioning decoder (caption or pretrain; a name, path or Blip);
    filter: one with the ITM head and ITC projections (retrieval or pretrain). items_or_source: a JSON
    list file, webdataset shards (folder, glob, brace range, list of .tar) or a list of
    {"image", "caption", "noise"?} dicts. options: the fields of `Options` (num_captions, num_beams,
    top_p, top_k, repetition_penalty, max_length, min_length, prompt, threshold, seed, batch_size,
    part_size, image_root, device, dtype, workers, progress, force, rank, world_size).
    Writes out_dir/bootstrapped.json, shards/, audit.parquet, summary.json (see docs/capfilt.md).
    """
    unknown = set(options) - {f.name for f in fields(Options)}
    if unknown:
        raise ValueError(f"unknown capfilt option(s): {', '.join(sorted(unknown))}")
    opts = Options(**options)
    opts.check()
    if opts.image_root is not None:
        opts.image_root = os.fspath(opts.image_root)
    rank, world = _rank_world(opts)
    source = Source(items_or_source, opts.image_root, opts.part_size, out_dir)
    device = _device(opts)
    dtype = opts.dtype or ("bf16" if device.type == "cuda" else "fp32")
    models = (load_role(captioner, "captioner", device, dtype), load_role(filter, "filter", device, dtype))
    args = {k: v for k, v in asdict(opts).items()
            if k not in ("device", "workers", "progress", "force", "rank", "world_size")}
    # what the models run in (a Blip passed in is used where it is, as it is)
    precision = ["/".join(str(d).removeprefix("torch.") for d in (m.dtype, m.text_dtype)) for m in models]
    args.update(captioner=_identity(captioner), filter=_identity(filter), dtype=precision,
                device=models[0].device.type, data=source.description)
    manifest = {"version": VERSION, "args": args, "parts": [p.source for p in source.parts]}
    run = RunFolder(out_dir, manifest, rank, opts.force)

    mine = [p for p in source.parts[rank::world] if not run.done(p)]
    sizes = [source.size(p) for p in mine]
    bar = None
    if opts.progress and rank == 0:
        from tqdm import tqdm
        bar = tqdm(total=sum(sizes) if None not in sizes else None, unit="img", file=sys.stderr,
                   desc=f"capfilt {len(mine)} part(s)" + (f" of {world} ranks" if world > 1 else ""))
    done = []
    for part in mine:
        done.append(process_part(part, source, models, opts, run, bar))
    if bar is not None:
        bar.close()
    if rank != 0:
        return {"rank": rank, "parts": done}
    _wait(lambda: all(run.done(p) for p in source.parts), "the other ranks' parts")
    return run.assemble(source.parts, opts)
