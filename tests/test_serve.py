"""`blip serve` against a real uvicorn on loopback: every endpoint against direct model calls, every
limit, bad uploads, wrong checkpoints (409), a full queue (503), a timeout (504), batched = single."""
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import torch

import blip
from blip.serve import Limits, Models, create_app
from serving import Served, pil, png, save_tiny

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    return save_tiny(tmp_path_factory.mktemp("serve"))


@pytest.fixture(scope="module")
def models(ckpts):
    return {task: blip.load(path, device="cpu") for task, path in ckpts.items()}


@pytest.fixture(scope="module")
def index(models, tmp_path_factory):
    """An image index of six generated pictures, built with the retrieval model."""
    from blip.index import build_index
    root = tmp_path_factory.mktemp("index")
    for i in range(6):
        (root / "images").mkdir(exist_ok=True)
        (root / "images" / f"{i}.png").write_bytes(png(10 + i))
    return build_index(models["retrieval"], root / "images", root / "index", progress=False)


@pytest.fixture(scope="module")
def full(models, index):
    """Caption, retrieval and VQA models and the image index behind one server."""
    served = Served(create_app(Models(main=models["caption"], retrieval=models["retrieval"], vqa=models["vqa"],
                                      index=index), max_wait=0.002))
    yield served
    served.close()


def post(served, path, files=None, data=None, **kw):
    return httpx.post(served.url + path, files=files, data=data, timeout=30, **kw)


def image(seed=0):
    return {"image": ("x.png", png(seed), "image/png")}


def assert_error(r, status, kind=None):
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) >= {"error", "detail"} and "Traceback" not in r.text
    if kind:
        assert body["error"] == kind, body


# ------------------------------------------------------------------ endpoints against the models
def test_caption_vqa_match_embed_classify_equal_direct_calls(full, models):
    cap, ret, vqa = models["caption"], models["retrieval"], models["vqa"]
    img = pil(png(3))

    r = post(full, "/caption", image(3), {"num_beams": 2, "max_length": 12, "min_length": 3})
    assert r.status_code == 200, r.text
    want = cap.caption([img], num_beams=2, max_length=12, min_length=3, return_ids=True)[0]
    assert r.json()["ids"] == want["ids"] and r.json()["caption"] == want["caption"]
    r = post(full, "/caption", image(3), {"sample": "true", "seed": 5, "prompt": "a photo of "})
    want = cap.caption([img], sample=True, prompt="a photo of ", return_ids=True,
                       generator=torch.Generator().manual_seed(5))[0]
    assert r.json()["ids"] == want["ids"]

    r = post(full, "/vqa", image(3), {"question": ["what is it?", "how many?"]})
    assert r.json()["answers"] == vqa.answer(img, ["what is it?", "how many?"])
    answers = ["red", "blue", "two", "a dog"]
    r = post(full, "/vqa", image(3), {"question": "what colour?", "answers": answers})
    assert r.json()["answers"] == vqa.answer(img, ["what colour?"], answer_list=answers) and r.json()["ranked"]

    texts = ["a red square", "two dogs on a beach", "x"]
    r = post(full, "/match", image(3), {"text": texts})
    direct = ret.match(img, texts)
    assert r.json()["texts"] == texts
    torch.testing.assert_close(torch.tensor(r.json()["itm"]), direct["itm"], rtol=0, atol=1e-5)
    torch.testing.assert_close(torch.tensor(r.json()["itc"]), direct["itc"], rtol=0, atol=1e-5)
    r = post(full, "/match", image(3), {"text": texts, "first_token": "cls"})
    torch.testing.assert_close(torch.tensor(r.json()["itm"]), ret.match(img, texts, first_token="cls")["itm"],
                               rtol=0, atol=1e-5)

    r = post(full, "/embed", image(3), {"text": texts[:2]})
    torch.testing.assert_close(torch.tensor(r.json()["image"]), ret.embed_images(img)[0], rtol=0, atol=1e-5)
    torch.testing.assert_close(torch.tensor(r.json()["text"]), ret.embed_texts(texts[:2]), rtol=0, atol=1e-5)
    assert "image" not in post(full, "/embed", data={"text": "only text"}).json()

    labels = ["square", "dog", "circle", "car"]
    r = post(full, "/classify", image(3), {"label": labels, "rerank": 2}).json()
    prompts = [f"a picture of {label}" for label in labels]
    itc = (ret.embed_images(img) @ ret.embed_texts(prompts).t())[0]
    top2 = itc.argsort(descending=True)[:2].tolist()
    itm = ret.match(img, [prompts[i] for i in top2])["itm"]
    assert r["label"] == labels[top2[int(itm.argmax())]]
    assert {row["label"] for row in r["ranking"][:2]} == {labels[i] for i in top2}
    assert [row["itm"] is None for row in r["ranking"]] == [False, False, True, True]
    by_label = {row["label"]: row["itc"] for row in r["ranking"]}
    torch.testing.assert_close(torch.tensor([by_label[lb] for lb in labels]), itc, rtol=0, atol=1e-5)


def test_ground_and_search_equal_direct_calls(full, models, index):
    import base64
    import io

    from PIL import Image

    from blip import grounding
    ret, img = models["retrieval"], pil(png(3, (160, 120)))
    r = post(full, "/ground", {"image": ("x.png", png(3, (160, 120)), "image/png")}, {"text": "a red square, left"})
    assert r.status_code == 200, r.text
    g, want = r.json(), grounding.gradcam(ret, img, "a red square, left")
    assert g["words"] == want["words"] and g["grid"] == list(want["grid"])
    torch.testing.assert_close(torch.tensor(g["text_map"]), want["text_map"], rtol=0, atol=1e-5)
    torch.testing.assert_close(torch.tensor(g["word_maps"]), want["word_maps"], rtol=0, atol=1e-5)
    assert abs(g["itm"] - want["itm"]) < 1e-5 and len(g["word_overlays"]) == len(g["words"])
    assert Image.open(io.BytesIO(base64.b64decode(g["overlay"]))).size == (160, 120)
    assert_error(post(full, "/ground", image(), {"text": "!!!"}), 422)
    assert g["method"] == want["method"]
    r = post(full, "/ground", {"image": ("x.png", png(3, (160, 120)), "image/png")},
             {"text": "a red square, left", "method": "saliency"})
    sal = grounding.gradcam(ret, img, "a red square, left", method="saliency")
    assert r.status_code == 200 and r.json()["method"] == "saliency", r.text
    torch.testing.assert_close(torch.tensor(r.json()["text_map"]), sal["text_map"], rtol=0, atol=1e-5)
    assert_error(post(full, "/ground", image(), {"text": "a", "method": "cam"}), 422)

    r = post(full, "/search", data={"text": "a red square", "k": 3}).json()
    direct = index.search(ret, "a red square", k=3, rerank=True)
    assert [h["path"] for h in r["results"]] == [h["path"] for h in direct]
    for got, exp in zip(r["results"], direct):
        assert abs(got["score"] - exp["score"]) < 1e-5 and abs(got["itm"] - exp["itm"]) < 1e-5
        assert Image.open(io.BytesIO(base64.b64decode(got["thumbnail"]))).format == "JPEG"
    r = post(full, "/search", {"image": ("q.png", png(12), "image/png")}, {"k": 2, "thumbnails": "false"}).json()
    assert [h["path"] for h in r["results"]] == [h["path"] for h in index.search(ret, pil(png(12)), k=2)]
    assert r["results"][0]["path"].endswith("2.png") and "thumbnail" not in r["results"][0]


def test_pages_health_openapi(full):
    page = httpx.get(full.url + "/")
    assert page.status_code == 200 and "<script>" in page.text
    assert "cdn" not in page.text.lower() and 'src="http' not in page.text
    health = httpx.get(full.url + "/health").json()
    assert health["status"] == "ok" and health["models"]["vqa"]["task"] == "vqa" and health["index"]["images"] == 6
    spec = httpx.get(full.url + "/openapi.json").json()
    assert {"/caption", "/vqa", "/match", "/classify", "/embed", "/ground", "/search", "/health"} <= set(spec["paths"])
    docs = httpx.get(full.url + "/docs")
    assert docs.status_code == 200 and "cdn" not in docs.text.lower()  # works offline: Swagger UI served locally
    assert httpx.get(full.url + "/_swagger/swagger-ui-bundle.js").status_code == 200
    assert_error(httpx.get(full.url + "/nowhere"), 404)
    assert_error(httpx.get(full.url + "/caption"), 405)


# ------------------------------------------------------------------ limits and bad input
@pytest.fixture(scope="module")
def strict(models):
    limits = Limits(upload_bytes=30_000, pixels=200 * 200, text_chars=40, texts=3, labels=3, answers=4, k=5)
    served = Served(create_app(Models(main=models["caption"], retrieval=models["retrieval"], vqa=models["vqa"]),
                               limits))
    yield served
    served.close()


def test_limits_answer_json_errors(strict):
    big = os.urandom(40_000)
    assert_error(post(strict, "/caption", {"image": ("x.png", big, "image/png")}), 413, "too_large")

    def chunked():  # no Content-Length: the body is counted as it streams
        yield b"--b\r\nContent-Disposition: form-data; name=\"image\"; filename=\"x\"\r\n\r\n"
        for _ in range(20):
            yield os.urandom(5_000)
        yield b"\r\n--b--\r\n"
    r = httpx.post(strict.url + "/caption", content=chunked(), timeout=30,
                   headers={"content-type": "multipart/form-data; boundary=b"})
    assert_error(r, 413, "too_large")

    assert_error(post(strict, "/caption", {"image": ("x.png", png(0, (300, 300)), "image/png")}), 413, "too_large")
    assert_error(post(strict, "/caption", {"image": ("x.txt", b"hello, not an image", "text/plain")}), 415)
    assert_error(post(strict, "/caption", {"image": ("x.png", png(0)[:70], "image/png")}), 422, "bad_image")
    assert_error(post(strict, "/caption", {"image": ("x.png", b"", "image/png")}), 422)
    assert_error(post(strict, "/caption", data={"num_beams": 2}), 422, "invalid")  # no image
    assert_error(post(strict, "/caption", image(), {"num_beams": 0}), 422, "invalid")
    assert_error(post(strict, "/caption", image(), {"min_length": 9, "max_length": 5}), 422)
    assert_error(post(strict, "/caption", image(), {"prompt": "a b c d " * 4, "max_length": 5}), 422)
    assert_error(post(strict, "/match", image(), {"text": ["a", "b", "c", "d"]}), 422, "too_many")
    assert_error(post(strict, "/match", image(), {"text": "x" * 41}), 422, "too_long")
    assert_error(post(strict, "/match", image(), {"text": "   "}), 422)
    assert_error(post(strict, "/classify", image(), {"label": list("abcd")}), 422, "too_many")
    assert_error(post(strict, "/classify", image(), {"label": ["a"], "template": "no slot"}), 422)
    assert_error(post(strict, "/vqa", image(), {"question": "q?", "answers": list("abcde")}), 422, "too_many")
    assert_error(post(strict, "/embed", data={}), 422)
    assert_error(post(strict, "/search", data={"text": "a dog", "k": 6}), 422, "too_many")
    assert_error(post(strict, "/search", data={}), 422)
    assert post(strict, "/caption", image()).status_code == 200  # still serving


def test_bomb_header_is_refused_before_decoding(strict):
    import struct
    import zlib

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    bomb = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 100_000, 100_000, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\0" * 1000)) + chunk(b"IEND", b""))
    assert_error(post(strict, "/caption", {"image": ("b.png", bomb, "image/png")}), 413, "too_large")


def test_unexpected_error_is_500_with_an_id(strict, caplog):
    def boom():
        raise RuntimeError("secret internals")
    strict.app.add_api_route("/boom", boom)
    r = httpx.get(strict.url + "/boom")
    assert_error(r, 500, "internal")
    assert "secret" not in r.text and len(r.json()["id"]) == 12
    assert any(r.json()["id"] in rec.getMessage() and rec.exc_info for rec in caplog.records)
    assert httpx.get(strict.url + "/health").status_code == 200


# ------------------------------------------------------------------ which model serves which endpoint
def test_missing_parts_answer_409(models):
    served = Served(create_app(Models(main=models["caption"])))
    try:
        for path, data in (("/match", {"text": "a"}), ("/vqa", {"question": "what?"}), ("/classify", {"label": "a"}),
                           ("/embed", {"text": "a"}), ("/ground", {"text": "a"})):
            r = post(served, path, image(), data)
            assert_error(r, 409, "wrong_model")
            assert "checkpoint" in r.json()["detail"] and "blip serve with" in r.json()["detail"]
        assert post(served, "/embed", image()).status_code == 200  # an image embedding needs only the ViT
        assert_error(post(served, "/search", data={"text": "a"}), 409, "no_index")
    finally:
        served.close()
    served = Served(create_app(Models(main=models["vqa"])))
    try:
        assert_error(post(served, "/caption", image()), 409, "wrong_model")
        assert post(served, "/vqa", image(), {"question": "what?"}).status_code == 200
    finally:
        served.close()


# ------------------------------------------------------------------ queue, timeout, batching
def test_full_queue_is_503_and_slow_requests_504(models):
    served = Served(create_app(Models(main=models["caption"]), max_queue=2, timeout=20))
    pool = ThreadPoolExecutor(4)
    try:
        release = served.hold_worker()
        queued = [pool.submit(post, served, "/caption", image(i)) for i in range(2)]
        served.wait_for(lambda: len(served.batcher.waiting) == 2)
        r = post(served, "/caption", image(5))
        assert_error(r, 503, "busy")
        assert r.headers["retry-after"] == "1"
        release.set()
        assert [f.result().status_code for f in queued] == [200, 200]

        served.batcher.timeout = 0.3
        release = served.hold_worker()
        t0 = time.monotonic()
        assert_error(post(served, "/caption", image(1)), 504, "timeout")
        assert time.monotonic() - t0 < 5 and not served.batcher.waiting  # dropped from the queue
        release.set()
        served.batcher.timeout = 20
        assert post(served, "/caption", image(1)).status_code == 200
    finally:
        pool.shutdown()
        served.close()


def test_concurrent_requests_batch_and_equal_single_results(models):
    served = Served(create_app(Models(main=models["caption"], retrieval=models["retrieval"]), max_batch=4))
    single = Served(create_app(Models(main=models["caption"], retrieval=models["retrieval"]), max_batch=1))
    pool = ThreadPoolExecutor(12)
    texts = [["a cat"], ["a dog", "two red squares on a table"], ["x", "y", "z"], ["a long text " * 5]]
    requests = ([("/caption", i, {"num_beams": 2}) for i in range(4)]
                + [("/match", i, {"text": t}) for i, t in enumerate(texts)]
                + [("/embed", i, {"text": t}) for i, t in enumerate(texts)])
    try:
        release = served.hold_worker()
        before = served.batcher.batches
        futures = [pool.submit(post, served, path, image(i), data) for path, i, data in requests]
        served.wait_for(lambda: len(served.batcher.waiting) == len(requests))
        release.set()
        batched = [f.result().json() for f in futures]
        assert served.batcher.batches - before == 3  # one batch per endpoint
        alone = [post(single, path, image(i), data).json() for path, i, data in requests]
        assert single.batcher.requests == single.batcher.batches
        for (path, _, _), b, a in zip(requests, batched, alone):
            if path == "/caption":
                assert b == a
            for key in ("itm", "itc", "image", "text"):
                if key in a:
                    torch.testing.assert_close(torch.tensor(b[key]), torch.tensor(a[key]), rtol=0, atol=1e-5)
    finally:
        pool.shutdown()
        served.close()
        single.close()


def test_batcher_waits_only_for_requests_being_decoded():
    """A lone job runs at once (no max_wait); one whose batch-mate is still being decoded waits for it."""
    import asyncio

    from blip.serve.batcher import Batcher

    async def scenario():
        batcher = Batcher(max_batch=8, max_wait=5.0)
        calls = []

        def fn(payloads):
            calls.append(list(payloads))
            return [p * 10 for p in payloads]
        t0 = time.monotonic()
        assert await batcher.submit(fn, 1, ("k",)) == 10
        assert time.monotonic() - t0 < 2.0  # did not sit out max_wait

        async def decoded_later(value):
            with batcher.preparing("k"):
                await asyncio.sleep(0.05)
            return await batcher.submit(fn, value, ("k",))

        async def right_away(value):
            await asyncio.sleep(0)  # let decoded_later enter `preparing` first
            return await batcher.submit(fn, value, ("k",))
        assert await asyncio.gather(decoded_later(2), right_away(3)) == [20, 30]
        assert calls == [[1], [3, 2]] and (batcher.batches, batcher.requests) == (2, 3)
        batcher.close()
    asyncio.run(scenario())


# ------------------------------------------------------------------ the command line
def test_blip_serve_command(ckpts, index, tmp_path):
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(sys.path)}
    # no --retrieval: the checkpoint the index was built with serves /match and /search
    proc = subprocess.Popen([sys.executable, "-m", "blip.cli", "serve", "--model", "tiny", "--index", str(index.root),
                             "--port", str(port), "--device", "cpu", "--log-level", "warning"],
                            stderr=subprocess.PIPE, text=True, env=env)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while True:
            try:
                health = httpx.get(url + "/health").json()
                break
            except httpx.TransportError:
                assert proc.poll() is None and time.monotonic() < deadline, "blip serve did not start"
                time.sleep(0.2)
        assert health["models"]["caption"]["source"] == "tiny" and health["models"]["match"]["task"] == "retrieval"
        assert health["index"]["images"] == 6 and health["models"]["match"]["source"] == index.info["model"]
        assert Path(index.info["model"]) == Path(ckpts["retrieval"]).resolve()
        assert httpx.post(url + "/caption", files=image()).status_code == 200
        assert httpx.post(url + "/match", files=image(), data={"text": "a"}).status_code == 200
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=20)
    assert "'tiny' is a preset: random weights" in err


def test_blip_serve_bad_model_or_index_is_one_line(tmp_path, index, capsys):
    from blip.cli import main
    assert main(["serve", "--model", str(tmp_path / "none")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("blip: error:") and err.count("\n") == 1
    assert main(["serve", "--model", "tiny", "--retrieval", "tiny", "--device", "cpu", "--index", str(index.root)]) == 2
    assert "built with another model" in capsys.readouterr().err
