"""CapFilt (`blip capfilt`, blip.capfilt.bootstrap) on tiny random models and a handful of synthetic web
pairs: per-image seeding, the filter's scores against Blip.match, the threshold rule, kill -9 and resume,
two ranks under torchrun, and the wrong checkpoint kind for each role."""
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

pq = pytest.importorskip("pyarrow.parquet")

import blip  # noqa: E402
from blip.capfilt import bootstrap  # noqa: E402
from blip.checkpoint import save_blip  # noqa: E402
from blip.cli import main  # noqa: E402
from blip.data.synth import generate_corpus  # noqa: E402

SRC = str(Path(__file__).resolve().parents[1] / "src")


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    before = torch.get_num_threads()  # tiny models: one thread is fastest, and immune to a busy machine
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("capfilt")
    generate_corpus(root / "corpus", n_train=9, n_clean=1, n_test=1, image_size=48, shard_size=4)
    meta = json.loads((root / "corpus" / "metadata.json").read_text())
    web = [{"image": p["image"], "caption": p["caption"], "noise": p["noise"]} for p in meta["pretrain"]]
    web[4]["caption"] = "  "  # no usable web text: only its synthetic caption is scored
    (root / "corpus" / "web.json").write_text(json.dumps(web))
    torch.manual_seed(0)
    cap, ret = blip.create_model("tiny", task="caption"), blip.create_model("tiny", task="retrieval")
    with torch.no_grad():  # centre the random ITM head on these pairs, so that some texts pass 0.5 and some not
        p = torch.cat([ret.match(str(root / "corpus" / w["image"]), w["caption"] or "x")["itm"] for w in web])
        ret.itm_head.bias[1] -= torch.logit(p.median())
    save_blip(cap, root / "cap")
    save_blip(ret, root / "ret")
    (root / "runs").mkdir()  # every run's folder sits here: the same relative path to the images
    return {"root": root, "runs": root / "runs", "json": str(root / "corpus" / "web.json"),
            "shards": str(root / "corpus" / "shards"),
            "cap": str(root / "cap"), "ret": str(root / "ret"), "cap_model": cap.eval(), "ret_model": ret.eval()}


def cli_args(s, out, *extra):
    return ["capfilt", "--captioner", s["cap"], "--filter", s["ret"], "--data", s["json"], "--out", str(out),
            "--part-size", "3", "--batch-size", "2", "--workers", "0", "--quiet", "--device", "cpu", *extra]


@pytest.fixture(scope="module")
def reference(setup):
    """An uninterrupted CLI run (in this process): the bytes every other run must reproduce."""
    out = setup["runs"] / "ref"
    assert main(cli_args(setup, out)) == 0
    kept = sum(audit(out)["kept"])
    assert 0 < kept < len(audit(out)["kept"])  # some shard samples to compare, and some filtered
    return out


def audit(out):
    return pq.read_table(Path(out) / "audit.parquet").to_pydict()


def outputs(out) -> dict:
    """Every final output's bytes; summary.json without its wall-clock `speed` entry."""
    out = Path(out)
    files = {p.relative_to(out).as_posix(): p.read_bytes() for p in sorted(out.rglob("*"))
             if p.is_file() and p.parts[-2] != "parts" and p.name != "summary.json"}
    summary = json.loads((out / "summary.json").read_text())
    summary.pop("speed")
    return {**files, "summary": summary}


def test_outputs_do_not_depend_on_the_batch_size(setup):
    tmp_path = setup["runs"]
    runs = {}
    for bs in (1, 3):
        summary = bootstrap(setup["cap_model"], setup["ret_model"], setup["shards"], tmp_path / f"bs{bs}",
                            batch_size=bs, num_captions=2, workers=0, seed=3)
        runs[bs] = audit(tmp_path / f"bs{bs}")
    a, b = runs[1], runs[3]
    assert summary["images"] == 9 and summary["texts"]["synthetic"]["total"] == 18 and len(a["text"]) == 27
    for col in ("key", "image", "text", "source", "kept", "noise", "noise_kind"):
        assert a[col] == b[col], col
    assert torch.allclose(torch.tensor(a["itm"]), torch.tensor(b["itm"]), atol=1e-6)
    assert torch.allclose(torch.tensor(a["itc"]), torch.tensor(b["itc"]), atol=1e-6)
    assert (tmp_path / "bs1" / "bootstrapped.json").read_bytes() == \
        (tmp_path / "bs3" / "bootstrapped.json").read_bytes()
    syn = [t for t, s in zip(a["text"], a["source"]) if s == "synthetic"]
    assert syn[0] != syn[1]  # an image's two captions come from two generators
    # the noise labels of the shards' json reach the audit and the summary
    assert summary["noise"]["labelled_web_texts"] == 9 and summary["noise"]["noisy_before"] == 3
    assert a["noise"][0] is not None and all(n is None for n, s in zip(a["noise"], a["source"]) if s == "synthetic")
    # the seed matters: another seed, other captions for the same images
    from blip.capfilt import Options, synthetic_captions
    px = torch.randn(2, 3, 64, 64)
    one, four = (synthetic_captions(setup["cap_model"], px, ["a", "b"], Options(seed=s)) for s in (3, 4))
    assert one != four and one == synthetic_captions(setup["cap_model"], px, ["a", "b"], Options(seed=3))


def test_filter_scores_equal_blip_match(setup, reference):
    rows = audit(reference)
    web = json.loads(Path(setup["json"]).read_text())
    assert rows["source"].count("web") == 8 and rows["source"].count("synthetic") == 9  # item 4 has no web text
    model = setup["ret_model"]
    corpus = Path(setup["json"]).parent
    for key in sorted(set(rows["key"])):
        idx = [i for i, k in enumerate(rows["key"]) if k == key]
        texts = [rows["text"][i] for i in idx]
        got = model.match(str(corpus / web[int(key)]["image"]), texts)
        assert torch.allclose(got["itm"], torch.tensor([rows["itm"][i] for i in idx]), atol=1e-5)
        assert torch.allclose(got["itc"], torch.tensor([rows["itc"][i] for i in idx]), atol=1e-5)


def test_threshold_keeps_exactly_the_texts_with_itm_at_least_t(setup, reference):
    tmp_path = setup["runs"]
    itm = sorted(audit(reference)["itm"])
    t = itm[len(itm) // 2]  # a score that occurs: >= keeps it
    assert main(cli_args(setup, tmp_path / "t", "--threshold", repr(t))) == 0
    rows = audit(tmp_path / "t")
    assert rows["itm"] == audit(reference)["itm"]
    assert rows["kept"] == [x >= t for x in rows["itm"]] and 0 < sum(rows["kept"]) < len(itm)
    kept = [{"image": i, "caption": c} for i, c, k in zip(rows["image"], rows["text"], rows["kept"]) if k]
    assert json.loads((tmp_path / "t" / "bootstrapped.json").read_text()) == kept
    # the official loader finds every image: paths are relative to the output folder
    assert all((tmp_path / "t" / e["image"]).is_file() for e in kept)
    from blip.data.datasets import ShardDataset
    from blip.transform import EvalTransform
    shards = ShardDataset(tmp_path / "t" / "shards", transform=EvalTransform(32), max_words=100)
    assert [s["text"] for s in shards] == [blip.tokenizer.pre_caption(e["caption"], 100) for e in kept]
    summary = json.loads((tmp_path / "t" / "summary.json").read_text())
    assert summary["bootstrapped_pairs"] == len(kept) and summary["web_texts_missing"] == 1


def test_wrong_checkpoint_kind_for_each_role_exits_2_with_one_line(setup, tmp_path, capsys):
    for role, flags in (("captioner", ["--captioner", setup["ret"]]), ("filter", ["--filter", setup["cap"]])):
        args = cli_args(setup, tmp_path / role)
        i = args.index(flags[0])
        args[i + 1] = flags[1]
        assert main(args) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith(f"blip: error: the {role} needs a ")
        assert ("captioning" if role == "captioner" else "retrieval or pretrained") in err[0]
        assert not (tmp_path / role).exists()  # refused before any work


def test_other_arguments_refuse_unless_forced(setup, reference, capsys):
    tmp_path = setup["runs"]
    import shutil
    out = tmp_path / "again"
    shutil.copytree(reference, out)
    assert main(cli_args(setup, out, "--threshold", "0.9")) == 2
    assert "differs in: threshold" in capsys.readouterr().err
    assert main(cli_args(setup, out, "--threshold", "0.9", "--force")) == 0
    assert json.loads((out / "summary.json").read_text())["args"]["threshold"] == 0.9


def test_kill_9_then_the_same_command_gives_identical_outputs(setup, reference):
    tmp_path = setup["runs"]
    out = tmp_path / "killed"
    args = cli_args(setup, out)
    env = dict(os.environ, PYTHONPATH=SRC, OMP_NUM_THREADS="1", BLIP_CAPFILT_PAUSE="0.5")
    proc = subprocess.Popen([sys.executable, "-m", "blip.cli", *args], env=env, stderr=subprocess.PIPE)
    first = out / "parts" / "part-00000.parquet"
    deadline = time.monotonic() + 120
    while not first.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)  # in the middle of the second part
    proc.wait()
    assert first.exists(), proc.stderr.read().decode()[-2000:]
    assert not (out / "parts" / "part-00002.parquet").exists() and not (out / "summary.json").exists()
    # what other kill points leave behind: writes cut short, and a part whose shard was renamed but not its rows
    (out / "shards" / ".bootstrapped-00001.tar.tmp").write_bytes(b"half a tar")
    (out / "parts" / ".part-00001.parquet.tmp").write_bytes(b"half a table")
    (out / ".audit.parquet.tmp").write_bytes(b"half an audit")
    (out / "shards" / "bootstrapped-00002.tar").write_bytes(b"an old shard")
    assert main(args) == 0  # the same command
    assert outputs(out) == outputs(reference)
    assert not list(out.rglob(".*.tmp"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_ranks_under_torchrun_equal_one_process(setup, reference):
    tmp_path = setup["runs"]
    out = tmp_path / "ddp"
    env = dict(os.environ, PYTHONPATH=SRC, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--nnodes=1",
           f"--master_port={free_port()}", "-m", "blip.cli", *cli_args(setup, out)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert outputs(out) == outputs(reference)
    parts = [json.loads(pq.ParquetFile(p).schema_arrow.metadata[b"blip.capfilt.part"])
             for p in sorted((out / "parts").glob("*.parquet"))]
    assert [p["part"] for p in parts] == [0, 1, 2]


def test_beam_search_and_an_unreadable_image(setup):
    web = json.loads(Path(setup["json"]).read_text())[:4]
    (setup["root"] / "corpus" / "broken.jpg").write_bytes(b"not a jpeg")
    web[1]["image"] = "broken.jpg"
    out = setup["runs"] / "beam"
    summary = bootstrap(setup["cap_model"], setup["ret_model"], web, out, image_root=setup["root"] / "corpus",
                        num_beams=3, batch_size=3, workers=0)
    assert summary["items"] == 4 and summary["images"] == summary["texts"]["synthetic"]["total"] == 3
    assert summary["unreadable_images"] == 1 and "000000001" not in audit(out)["key"]
    beams = setup["cap_model"].caption([str(setup["root"] / "corpus" / web[0]["image"])], num_beams=3)
    assert audit(out)["text"][1] == beams[0]  # beam search is the plain captioner's
    with pytest.raises(ValueError, match="one caption per image"):
        bootstrap(setup["cap_model"], setup["ret_model"], web, out, num_beams=3, num_captions=2)


def test_out_folder_another_rank_started_is_not_foreign(tmp_path):
    """Under torchrun one rank may have made parts/ and shards/ (or be writing its manifest) before another
    looks at --out: that folder is this run's, while a folder with anything else in it is refused."""
    from blip.capfilt.pipeline import RunFolder
    manifest = {"args": {"k": 1}, "parts": []}
    started = tmp_path / "started"
    (started / "parts").mkdir(parents=True)
    (started / "shards").mkdir()
    (started / ".manifest.json.123.tmp").write_bytes(b"")
    RunFolder(started, manifest, rank=1, force=False)
    assert json.loads((started / "manifest.json").read_text()) == manifest
    foreign = tmp_path / "foreign"
    (foreign / "parts").mkdir(parents=True)
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="holds no capfilt run"):
        RunFolder(foreign, manifest, rank=0, force=False)
