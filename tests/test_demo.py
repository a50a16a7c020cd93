"""`make demo`'s job end to end in its --quick form on a small corpus: trains, probes, plots, summarises."""
import json
import subprocess
import sys

from blip.data import generate_corpus


def test_demo_quick_prints_the_targets_and_writes_its_outputs(tmp_path):
    corpus = tmp_path / "corpus"
    generate_corpus(corpus, seed=0, n_train=64, n_clean=8, n_test=12, image_size=64, shard_size=64)
    out = subprocess.run([sys.executable, "-m", "blip.demo", "--quick", "--corpus", str(corpus),
                          "--out", str(tmp_path / "demo"), "device=cpu"],
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    for line in ("ITM one-attribute accuracy", "zero-shot IR@1", "zero-shot TR@1", "captions: one-object",
                 "pretraining minutes"):
        assert line in out.stdout
    summary = json.loads((tmp_path / "demo" / "demo_summary.json").read_text())
    assert {t["name"] for t in summary["targets"]} >= {"ITM one-attribute accuracy %", "pretraining minutes"}
    assert summary["quality"]["itm_pairs"] > 0 and summary["train"]["global_step"] == 4
    png = (tmp_path / "demo" / "loss.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
