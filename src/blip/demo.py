"""`make demo`: the main job on the embedded default, with nothing downloaded.

1. generate the synthetic web corpus (`blip data synth`), unless it is already there;
2. pretrain the `small` preset on it with ITC + ITM + LM (`configs/pretrain_synthetic.json`);
3. evaluate zero-shot image-text retrieval on its test split and caption a few test images.

Everything lands in `runs/demo/`; `--quick` shrinks the run to a one-minute smoke test.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m blip.demo")
    ap.add_argument("--out", default="runs/demo")
    ap.add_argument("--corpus", default="runs/synthetic")
    ap.add_argument("--config", default=str(ROOT / "configs" / "pretrain_synthetic.json"))
    ap.add_argument("--quick", action="store_true", help="a few steps only (smoke test)")
    args = ap.parse_args(argv)

    import blip
    from blip.data.synth import generate_corpus
    from blip.evaluate import evaluate_retrieval
    from blip.train.config import TrainConfig
    from blip.train.loop import Trainer

    corpus, out = Path(args.corpus), Path(args.out)
    t0 = time.perf_counter()
    if not (corpus / "test.json").exists():
        counts = generate_corpus(corpus, seed=0)
        print(f"[1/3] synthetic corpus in {corpus} ({time.perf_counter() - t0:.0f}s): {counts}")
    else:
        print(f"[1/3] synthetic corpus already in {corpus}")

    overrides = [f"train_files={json.dumps([str(corpus / 'pretrain.json'), str(corpus / 'clean_train.json')])}"]
    if args.quick:
        overrides += ["max_steps=4", "log_interval=1", "progress=false"]
    cfg = TrainConfig.load(args.config, overrides)
    cfg.train_files = [f for f in cfg.train_files if Path(f).exists()]
    t1 = time.perf_counter()
    trainer = Trainer(cfg, out)
    summary = trainer.train()
    if not (out / "model").exists():  # a run cut short by max_steps exports nothing by itself
        trainer.export_model()
    minutes = (time.perf_counter() - t1) / 60
    print(f"[2/3] pretrained 'small' in {minutes:.1f} min: {summary}")

    model = blip.load(out / "model", task="retrieval")
    metrics = evaluate_retrieval(model, corpus / "test.json")
    print(f"[3/3] zero-shot retrieval on {corpus / 'test.json'}: "
          + "  ".join(f"{k} {v:.1f}" for k, v in metrics.items()))
    captioner = blip.load(out / "model", task="caption")
    tests = json.loads((corpus / "test.json").read_text())[:3]
    for entry, caption in zip(tests, captioner.caption([str(corpus / e["image"]) for e in tests])):
        print(f"      {entry['image']}: {caption!r}   (reference: {entry['caption'][0]!r})")
    (out / "demo_summary.json").write_text(json.dumps({"train": summary, "retrieval": metrics,
                                                        "train_minutes": minutes}, indent=2, default=str))
    print(f"done in {(time.perf_counter() - t0) / 60:.1f} min; model in {out / 'model'} (blip.load works on it)")


if __name__ == "__main__":
    main()
