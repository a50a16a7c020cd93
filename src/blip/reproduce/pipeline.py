"""`blip reproduce`: the paper's pipeline end to end (pretrain, finetune a captioner and a filter, bootstrap
the web pairs, pretrain again, compare), on the embedded synthetic corpus or any folder holding
`pretrain.json` (web pairs, optionally a "noise" label each), `clean_train.json` (human-annotated pairs)
and `test.json` (`[{"image", "caption": [refs]}]`), all in the official formats.

Stages, each in its own folder of `out/`, reused when its output is there (a second run resumes a stage
cut short; `force` redoes them all):

1. `pretrain_web`: pretrain on web + clean pairs (the "no CapFilt" row);
2. `captioner` (captioning finetune) and `filter` (retrieval finetune, ITC + ITM), separately, from it,
   on the clean pairs;
3. `capfilt`: bootstrap the web pairs (`blip.capfilt.bootstrap`: one nucleus-sampled caption per image,
   the filter's ITM probability for the web and the synthetic text);
4. `pretrain_<row>`: a new model from scratch on each row's pairs + the clean pairs, same budget
   (rows: `filter` = the web texts the filter keeps, `captioner` = web + synthetic texts unfiltered,
   `capfilt` = the kept web and synthetic texts);
5. `eval_<row>`: zero-shot retrieval on the test split, and CIDEr after the same short captioning finetune.

The report (report.md, report.html, report.json) is written by `blip.reproduce.report`.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]
CONFIGS = ROOT / "configs"
ROWS = {"none": "no CapFilt", "filter": "filter only", "captioner": "captioner only", "capfilt": "captioner + filter"}


@dataclass
class Options:
    corpus: Path
    out: Path
    rows: tuple[str, ...] = ("none", "filter", "captioner", "capfilt")
    quick: bool = False
    force: bool = False
    seed: int = 42
    pretrain_config: Path = CONFIGS / "pretrain_synthetic.json"
    caption_config: Path = CONFIGS / "caption_synthetic.json"
    filter_config: Path = CONFIGS / "filter_synthetic.json"
    pretrain_overrides: list[str] = field(default_factory=list)
    web_limit: int | None = None           # first N web pairs only (quick runs)
    device: str | None = None
    progress: bool = True
    caption_scorers: tuple[str, ...] | None = None  # None: all of blip.eval.caption's (METEOR's Java start is slow)


def _log(msg: str) -> None:
    print(f"blip reproduce: {msg}", flush=True)


def _done(folder: Path) -> bool:
    return (folder / "model" / "config.json").exists()


def _train(config: Path, out: Path, overrides: list[str], opts: Options) -> dict:
    """One training run (pretraining or finetuning) into `out`, resumed when a checkpoint is there."""
    from ..train.config import TrainConfig
    from ..train.loop import Trainer
    cfg = TrainConfig.load(config, overrides + [f"seed={opts.seed}"] + ([f"device={opts.device}"] if opts.device else [])
                           + ([] if opts.progress else ["progress=false"]))
    trainer = Trainer(cfg, out, resume="auto")
    result = trainer.train()
    if not (out / "model").exists():  # cut short by max_steps: export what there is
        trainer.export_model()
    return result


def _files(paths) -> str:
    return "train_files=" + json.dumps([str(p) for p in paths])


class Pipeline:
    def __init__(self, opts: Options):
        for name in ("pretrain.json", "clean_train.json", "test.json"):
            if not (opts.corpus / name).exists():
                raise FileNotFoundError(f"{opts.corpus / name} not found: the corpus folder needs pretrain.json, "
                                        f"clean_train.json and test.json (blip data synth --out DIR makes one)")
        unknown = [r for r in opts.rows if r not in ROWS]
        if unknown or not opts.rows:
            raise ValueError(f"rows must be some of {', '.join(ROWS)}, got {list(opts.rows)}")
        self.o = opts
        self.out = opts.out
        self.out.mkdir(parents=True, exist_ok=True)
        self.minutes: dict[str, float] = {}
        if opts.force:
            import shutil
            for child in self.out.iterdir():
                if child.is_symlink():  # out/model points at the first pretrained model
                    child.unlink()
                elif child.is_dir():
                    shutil.rmtree(child)
        self.quick = ["max_steps=6", "itc_only_steps=2", "log_interval=1", "batch_size=16"] if opts.quick else []

    # ------------------------------------------------------------------ helpers
    def _stage(self, name: str, fn):
        t = time.perf_counter()
        result = fn()
        self.minutes[name] = round((time.perf_counter() - t) / 60, 2)
        _log(f"{name}: {self.minutes[name]:.1f} min")
        return result

    def web_file(self) -> Path:
        """The web pairs as a JSON list with absolute image paths and their noise labels (from metadata.json
        when the corpus is ours), limited to web_limit pairs."""
        path = self.out / "data" / "web.json"
        if path.exists() and not self.o.force:
            return path
        corpus = self.o.corpus
        web = json.loads((corpus / "pretrain.json").read_text())
        meta = corpus / "metadata.json"
        noise = None
        if meta.exists():
            pairs = json.loads(meta.read_text()).get("pretrain")
            if pairs and len(pairs) == len(web):
                noise = [p.get("noise") for p in pairs]
        items = []
        for i, w in enumerate(web[: self.o.web_limit]):
            item = {"image": str((corpus / w["image"]).resolve()), "caption": w["caption"], "key": f"{i:09d}"}
            if "noise" in w:  # null / false / "": a clean pair; a string names the noise kind
                item["noise"] = w["noise"] or None
            elif noise is not None:
                item["noise"] = noise[i] or None
            items.append(item)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(items))
        return path

    def clean_file(self) -> Path:
        return (self.o.corpus / "clean_train.json").resolve()

    def pretrain(self, name: str, files: list[Path]) -> Path:
        folder = self.out / name
        if not _done(folder):
            overrides = [_files(files)] + self._vocab() + self.o.pretrain_overrides + self.quick
            self._stage(name, lambda: _train(self.o.pretrain_config, folder, overrides, self.o))
        return folder / "model"

    def _vocab(self) -> list[str]:
        """A config that trims the vocabulary (vocab_from) gets this corpus's train files: its texts are
        what every model of the pipeline reads and writes."""
        from ..train.config import TrainConfig
        from ..vocab import corpus_override
        if TrainConfig.load(self.o.pretrain_config, self.o.pretrain_overrides).vocab_from is None:
            return []
        return [corpus_override(self.o.corpus)]

    def finetune(self, name: str, config: Path, init: Path, extra: list[str] = (),
                 validate: bool | None = None) -> Path:
        """A finetune on the clean pairs from `init`; with `validate`, the best epoch on val.json (else the
        test split when there is no val split) is kept, without it the last epoch. None: validate when the
        config names a val_file (the filter's is null: its best epoch by retrieval r_mean is not the best
        filter)."""
        folder = self.out / name
        corpus = self.o.corpus
        if not _done(folder):
            if validate is None:
                from ..train.config import TrainConfig
                validate = TrainConfig.load(config).val_file is not None
            val = corpus / "val.json" if (corpus / "val.json").exists() else corpus / "test.json"
            overrides = [f"init={init}", _files([self.clean_file()]),
                         f"val_file={val.resolve()}" if validate else "val_file=null", "test_file=null", *extra]
            if self.o.quick:
                overrides += ["max_steps=4", "epochs=1", "log_interval=1", "batch_size=8"]
            self._stage(name, lambda: _train(config, folder, overrides, self.o))
        return folder / "model"

    def _negative_pool(self) -> list[str]:
        """A filter config that draws ITM negatives from a pool of web texts gets the web pairs this run
        will filter (the config's own path names the embedded corpus's)."""
        from ..train.config import TrainConfig
        if TrainConfig.load(self.o.filter_config).negative_pool is None:
            return []
        return [f"negative_pool={self.web_file().resolve()}"]

    def bootstrap(self, captioner: Path, filter_: Path) -> Path:
        folder = self.out / "capfilt"
        if not (folder / "audit.parquet").exists() or not (folder / "summary.json").exists():
            import blip
            from ..capfilt import bootstrap
            cap = blip.load(captioner, device=self.o.device)
            flt = blip.load(filter_, device=self.o.device)
            # batches of 64 (the outputs do not depend on the batch size: each image's captions are seeded alone);
            # 1.17x the images/s of the default 16 for the mini model on 2 CPU cores
            self._stage("capfilt", lambda: bootstrap(cap, flt, self.web_file(), folder, seed=self.o.seed,
                                                     batch_size=64, progress=self.o.progress))
        return folder

    def row_data(self, row: str, capfilt: Path | None) -> Path:
        """The web side of a row's pretraining data as a JSON list."""
        if row == "none":
            return self.web_file()
        path = self.out / "data" / f"{row}.json"
        if path.exists() and not self.o.force:
            return path
        import pyarrow.parquet as pq
        audit = pq.read_table(capfilt / "audit.parquet").to_pylist()
        keep = {"filter": lambda r: r["source"] == "web" and r["kept"],
                "captioner": lambda r: True,
                "capfilt": lambda r: r["kept"]}[row]
        # the audit names images relative to the capfilt folder (as its bootstrapped.json does)
        items = [{"image": str((capfilt / r["image"]).resolve()), "caption": r["text"]} for r in audit if keep(r)]
        # the same budget for every row: a smaller set is repeated to the web set's size, so that an epoch
        # has as many steps as the no-CapFilt row's (a larger one, web + synthetic, is capped by steps_per_epoch)
        web = len(json.loads(self.web_file().read_text()))
        if items and len(items) < web:
            items = (items * -(-web // len(items)))[:web]
        path.write_text(json.dumps(items))
        return path

    def evaluate(self, row: str, model: Path) -> dict:
        """Zero-shot retrieval on the test split, and CIDEr after the same short captioning finetune."""
        folder = self.out / f"eval_{row}"
        result_file = folder / "result.json"
        if result_file.exists():
            return json.loads(result_file.read_text())

        def run():
            import blip
            from .. import eval as evaluation
            corpus = self.o.corpus
            m = blip.load(model, task="retrieval", device=self.o.device)
            retrieval = evaluation.evaluate("retrieval", m, corpus / "test.json", k_test=16, progress=False)
            del m
            # the same short captioning finetune for every row: one epoch, the last one kept
            cap_model = self.finetune(f"eval_{row}/caption", self.o.caption_config, model, ["epochs=1"],
                                      validate=False)
            gt = corpus / "test_gt.json"
            m = blip.load(cap_model, device=self.o.device)
            caption = evaluation.evaluate("caption", m, corpus / "test.json", out_dir=folder,
                                          **({"gt": gt} if gt.exists() else {}),
                                          **({"scorers": self.o.caption_scorers} if self.o.caption_scorers else {}))
            caption = {k.lower(): v for k, v in caption.items()}  # report.json: "cider", "bleu_4", ...
            return {"name": ROWS[row], "row": row, "retrieval": retrieval, "caption": caption}
        result = self._stage(f"eval_{row}", run)
        folder.mkdir(parents=True, exist_ok=True)
        result_file.write_text(json.dumps(result, indent=2, default=str))
        return result

    def probe(self, model: Path) -> dict | None:
        """What the first pretraining learnt, against the corpus's scene ground truth (our corpus only):
        ITM on one-attribute changes, zero-shot retrieval, greedy captions (blip.data.synth_quality)."""
        if not (self.o.corpus / "metadata.json").exists():
            return None
        path = model.parent / "probe.json"
        if path.exists():
            return json.loads(path.read_text())

        def run():
            import blip
            from ..data.synth_quality import probe
            return probe(blip.load(model, device=self.o.device), self.o.corpus, limit=40 if self.o.quick else None)
        result = self._stage("probe_pretrain", run)
        path.write_text(json.dumps(result, indent=2, default=str))
        return result

    # ------------------------------------------------------------------ the whole thing
    def run(self) -> dict:
        t0 = time.perf_counter()
        web, clean = self.web_file(), self.clean_file()
        base = self.pretrain("pretrain_none", [web, clean])
        link = self.out / "model"  # the first pretrained model where the finetuning configs look (runs/demo/model)
        if not link.exists() and not link.is_symlink():
            link.symlink_to(base.relative_to(self.out), target_is_directory=True)
        self.pretrained_probe = self.probe(base)
        needs_capfilt = any(r != "none" for r in self.o.rows)
        capfilt = None
        if needs_capfilt:
            captioner = self.finetune("captioner", self.o.caption_config, base)
            filter_ = self.finetune("filter", self.o.filter_config, base, extra=self._negative_pool())
            capfilt = self.bootstrap(captioner, filter_)
        rows = []
        for row in self.o.rows:
            model = base if row == "none" else self.pretrain(f"pretrain_{row}", [self.row_data(row, capfilt), clean])
            rows.append(self.evaluate(row, model))
        self.minutes["total"] = round((time.perf_counter() - t0) / 60, 2)
        from .report import write_report
        return write_report(self, rows, capfilt)
