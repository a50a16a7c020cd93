"""`blip reproduce --quick` end to end on a small synthetic corpus: every stage runs, the report holds every
figure the issue names, a second run reuses the stages, and the filter statistics are right."""
import json
from pathlib import Path

import numpy as np
import pytest

from blip.reproduce.report import auc, filter_stats

pytestmark = pytest.mark.usefixtures("one_thread")


def test_auc_is_the_mann_whitney_probability():
    rng = np.random.default_rng(0)
    pos, neg = rng.normal(1, 1, 50), rng.normal(0, 1, 60)
    direct = np.mean([(p > n) + 0.5 * (p == n) for p in pos for n in neg])
    assert auc(pos, neg) == pytest.approx(direct)
    assert auc(np.array([1.0, 1.0]), np.array([1.0])) == 0.5


def test_filter_stats_precision_recall():
    web = [{"itm": 0.9, "noise": "clean"}, {"itm": 0.4, "noise": "clean"}, {"itm": 0.2, "noise": "short"},
           {"itm": 0.6, "noise": "swapped"}]
    s = filter_stats(web, 0.5)
    assert s["precision"] == 0.5 and s["recall"] == 0.5  # dropped: 0.4 (clean), 0.2 (noisy)
    assert s["auc_by_kind"]["short"] == 1.0 and s["auc_by_kind"]["swapped"] == 0.5


def test_reproduce_quick_end_to_end(tmp_path, capsys):
    from blip.data.synth import generate_corpus
    from blip.reproduce import reproduce
    corpus = tmp_path / "corpus"
    generate_corpus(corpus, seed=0, n_train=48, n_clean=8, n_val=4, n_test=6, image_size=64, shard_size=48)
    out = tmp_path / "out"
    report = reproduce(corpus, out, rows=("none", "capfilt"), quick=True, progress=False, web_limit=None,
                       caption_scorers=("bleu", "cider"))
    assert [r["name"] for r in report["rows"]] == ["no CapFilt", "captioner + filter"]
    for r in report["rows"]:
        assert {"tr@1", "ir@1", "tr@5", "ir@5"} <= set(r["retrieval"]) and "cider" in r["caption"]
    f = report["filter"]
    assert {"auc", "auc_by_kind", "precision", "recall", "threshold"} <= set(f) and 0 <= f["auc"] <= 1
    assert set(f["auc_by_kind"]) == {"swapped", "wrong_attribute", "boilerplate", "short"}
    assert 0 < report["noise_ratio"]["before"] < 1
    assert "attribute_accuracy" in report["captioner"] and "pretrained" in report
    assert {"pretrain_none", "captioner", "filter", "capfilt", "pretrain_capfilt"} <= set(report["minutes"])
    # the filter's extra ITM negatives are the web texts this run filters, not the config's corpus path
    assert json.loads((out / "filter" / "train_config.json").read_text())["negative_pool"] == \
        str((out / "data" / "web.json").resolve())
    assert json.loads((out / "report.json").read_text())["rows"] == json.loads(json.dumps(report["rows"]))
    html = (out / "report.html").read_text()
    assert "data:image/png;base64" in html and "captioner + filter" in html and "http" not in html.split("<body>")[1]
    import pyarrow.parquet as pq
    audit = pq.read_table(out / "capfilt" / "audit.parquet").to_pylist()
    assert {r["source"] for r in audit} == {"web", "synthetic"} and len(audit) == 2 * 48
    kept = json.loads((out / "data" / "capfilt.json").read_text())  # the capfilt row's web side: what was kept
    assert len(kept) == sum(r["kept"] for r in audit) and all(Path(k["image"]).is_file() for k in kept)
    assert (out / "model" / "config.json").exists()  # the first pretrained model, where the configs look
    from blip.reproduce.cli import _print_pretraining_targets  # what `make demo` prints at its end
    capsys.readouterr()
    _print_pretraining_targets(report, out)
    printed = capsys.readouterr().out
    for line in ("pretraining minutes", "ITM one-attribute accuracy %", "zero-shot IR@1 % (ITC)",
                 "captions: one-object images right %", "filter AUC", "captioner names"):
        assert line in printed, printed
    # a second run reuses every stage
    again = reproduce(corpus, out, rows=("none", "capfilt"), quick=True, progress=False,
                      caption_scorers=("bleu", "cider"))
    assert again["rows"] == report["rows"]
    assert {k: v for k, v in again["minutes"].items() if k != "total"} == \
        {k: v for k, v in report["minutes"].items() if k != "total"}  # nothing redone
    from blip.reproduce import Options, Pipeline
    Pipeline(Options(corpus=corpus, out=out, quick=True, force=True))  # --force clears every stage, the link too
    assert not (out / "model").exists() and not (out / "pretrain_none").exists()
