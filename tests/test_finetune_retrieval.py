"""Retrieval finetuning (train/tasks/retrieval.py) and evaluation (eval/retrieval.py), against direct
computations written as the official BLIP_Retrieval.forward and train_retrieval.evaluation do them."""
import copy
import json
import os
import socket
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import blip
from blip.eval import retrieval as ev
from blip.tokenizer import ENC_ID, get_tokenizer
from blip.train.objectives import StepInfo, itc_loss, itm_negative_weights, ramped_alpha
from blip.train.tasks import build_objective

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_retrieval(seed=0, queue_size=8, **kw):
    torch.manual_seed(seed)
    model = blip.create_model("tiny", task="retrieval").eval()  # eval: no dropout, so a replay is exact
    return build_objective("retrieval", model, queue_size=queue_size, **kw)


def batch(ids, seed=0):
    g = torch.Generator().manual_seed(seed)
    texts = [f"a {c} shape number {i}" for c, i in zip(["red", "blue", "green", "tall"] * 4, ids)]
    return {"image": torch.randn(len(ids), 3, 64, 64, generator=g), "text": texts,
            "image_id": torch.tensor(ids)}


# ------------------------------------------------------------------------------ the objective
def test_itc_positives_generalise_the_one_hot():
    g = torch.Generator().manual_seed(0)
    f = [F.normalize(torch.randn(4, 8, generator=g), dim=-1) for _ in range(4)]
    queues = [F.normalize(torch.randn(8, 6, generator=g), dim=0) for _ in range(2)]
    onehot = torch.zeros(4, 10)
    onehot[:, :4] = torch.eye(4)
    a = itc_loss(*f, *queues, 0.07, 0.3)
    b = itc_loss(*f, *queues, 0.07, 0.3, positives=onehot)
    assert torch.equal(a[0], b[0])  # pretraining's targets unchanged
    # image-id positives: the official formula by hand
    idx, idx_queue = torch.tensor([0, 1, 0, 2]), torch.tensor([5, 1, -100, 0, 7, -100])
    pos = (idx[:, None] == torch.cat([idx, idx_queue])[None]).float()
    pos = pos / pos.sum(1, keepdim=True)
    image_feat, text_feat, image_m, text_m = f
    image_all, text_all = torch.cat([image_m.T, queues[0]], 1), torch.cat([text_m.T, queues[1]], 1)
    i2t_t = 0.3 * F.softmax(image_m @ text_all / 0.07, 1) + 0.7 * pos
    t2i_t = 0.3 * F.softmax(text_m @ image_all / 0.07, 1) + 0.7 * pos
    want = (-(F.log_softmax(image_feat @ text_all / 0.07, 1) * i2t_t).sum(1).mean()
            - (F.log_softmax(text_feat @ image_all / 0.07, 1) * t2i_t).sum(1).mean()) / 2
    got = itc_loss(*f, *queues, 0.07, 0.3, positives=pos)[0]
    assert torch.allclose(got, want, atol=1e-6)


def test_itm_weights_mask_same_image_without_offset():
    sim = torch.randn(4, 4)
    same = torch.tensor([[1, 0, 1, 0], [0, 1, 0, 0], [1, 0, 1, 0], [0, 0, 0, 1]]).bool()
    w = itm_negative_weights(sim, same=same, eps=0.0)
    assert torch.equal(w, F.softmax(sim, 1).masked_fill(same, 0))  # official: no +1e-4
    assert torch.equal(itm_negative_weights(sim), itm_negative_weights(sim, 0))  # pretraining unchanged
    # a row with every candidate of its own image cannot be sampled from: uniform
    assert torch.equal(itm_negative_weights(sim, same=torch.ones(4, 4).bool(), eps=0.0), torch.ones(4, 4))


def direct_step(o, b, info, uniform=False, pool=None, swap_weight=1.0, pool_draws=1):
    """The official BLIP_Retrieval.forward, spelt out on the model (plain cross-attention calls); with
    `uniform`, ITM's negatives drawn alike among the other images' pairs, b["neg_text"] (None: none)
    one more ITM negative per pair (weighing swap_weight in the loss's mean), and with `pool` each image
    paired with `pool_draws` texts drawn from it too."""
    m, mo = o.model, o.momentum
    ids, mask = get_tokenizer()(b["text"], max_length=35)
    idx = b["image_id"]
    alpha = 0.4 * min(1, info.step / info.steps_per_epoch) if info.epoch == 0 else 0.4
    image_embeds = m.visual_encoder(b["image"])
    image_feat = F.normalize(m.vision_proj(image_embeds[:, 0]), dim=-1)
    text_feat = F.normalize(m.text_proj(m.text_encoder(ids, mask, mode="text")[:, 0]), dim=-1)
    written = mo.image_queue.any(0)
    idx_all = torch.cat([idx, mo.idx_queue[0, written]])
    pos = (idx[:, None] == idx_all[None]).float()
    pos = pos / pos.sum(1, keepdim=True)
    mo.update(m)
    image_m = F.normalize(mo.vision_proj_m(mo.visual_encoder_m(b["image"])[:, 0]), dim=-1)
    text_m = F.normalize(mo.text_proj_m(mo.text_encoder_m(ids, mask, mode="text")[:, 0]), dim=-1)
    image_all = torch.cat([image_m.T, mo.image_queue[:, written]], 1)
    text_all = torch.cat([text_m.T, mo.text_queue[:, written]], 1)
    i2t_t = alpha * F.softmax(image_m @ text_all / m.temp, 1) + (1 - alpha) * pos
    t2i_t = alpha * F.softmax(text_m @ image_all / m.temp, 1) + (1 - alpha) * pos
    loss_ita = (-(F.log_softmax(image_feat @ text_all / m.temp, 1) * i2t_t).sum(1).mean()
                - (F.log_softmax(text_feat @ image_all / m.temp, 1) * t2i_t).sum(1).mean()) / 2
    enc = ids.clone()
    enc[:, 0] = ENC_ID
    same = idx[:, None] == idx[None]
    w_i2t = F.softmax(image_feat @ text_feat.T / m.temp, 1).masked_fill(same, 0)
    w_t2i = F.softmax(text_feat @ image_feat.T / m.temp, 1).masked_fill(same, 0)
    if uniform:
        w_i2t = w_t2i = (~same).float()
    neg_img = torch.multinomial(w_t2i, 1)[:, 0]
    neg_txt = torch.multinomial(w_i2t, 1)[:, 0]
    itm = lambda states, i, k: m.itm_head(m.text_encoder(i, k, states, mode="multimodal")[:, 0])  # noqa: E731
    logits = [itm(image_embeds, enc, mask), itm(image_embeds[neg_img], enc, mask),
              itm(image_embeds, enc[neg_txt], mask[neg_txt])]
    if pool:
        p_ids, p_mask = get_tokenizer()([pool[j] for j in torch.randint(len(pool), (len(idx) * pool_draws,)).tolist()],
                                        max_length=35)
        p_ids[:, 0] = ENC_ID
        logits.append(itm(image_embeds[torch.arange(len(idx)).repeat(pool_draws)], p_ids, p_mask))
    rows = [i for i, t in enumerate(b.get("neg_text") or []) if t is not None]
    if rows:
        s_ids, s_mask = get_tokenizer()([b["neg_text"][i] for i in rows], max_length=35)
        s_ids[:, 0] = ENC_ID
        logits.append(itm(image_embeds[rows], s_ids, s_mask))
    logits = torch.cat(logits)
    labels = torch.tensor([1] * len(idx) + [0] * (logits.shape[0] - len(idx)))
    weight = torch.ones(len(labels))
    weight[len(labels) - len(rows):] = swap_weight
    loss_itm = (F.cross_entropy(logits, labels, reduction="none") * weight).sum() / weight.sum()
    return loss_ita, loss_itm, neg_img, neg_txt


def test_objective_matches_the_official_forward_and_queues_ids():
    o = tiny_retrieval(queue_size=8)
    with torch.no_grad():
        o(batch([0, 1, 2, 3], seed=1), StepInfo(0, 1, 4))
    assert o.momentum.idx_queue[0, :4].tolist() == [0, 1, 2, 3] and o.momentum.idx_queue[0, 4:].eq(-100).all()
    assert int(o.momentum.queue_ptr) == 4
    b = batch([1, 5, 1, 7], seed=2)  # image 1 twice in the batch and once in the queue: three positives
    info = StepInfo(0, 2, 4)
    ref = copy.deepcopy(o)
    torch.manual_seed(3)
    with torch.no_grad():
        out = o(b, info)
    torch.manual_seed(3)
    with torch.no_grad():
        loss_ita, loss_itm, neg_img, neg_txt = direct_step(ref, b, info)
    assert torch.allclose(out["loss_ita"], loss_ita, atol=1e-5)
    assert torch.allclose(out["loss_itm"], loss_itm, atol=1e-5)
    assert torch.allclose(out["loss"], loss_ita + loss_itm, atol=1e-5)
    ids = b["image_id"]
    assert not (ids[neg_img] == ids).any() and not (ids[neg_txt] == ids).any()  # never the same image
    assert o.momentum.idx_queue[0].tolist() == [0, 1, 2, 3, 1, 5, 1, 7] and int(o.momentum.queue_ptr) == 0
    assert o.momentum.id_queue().tolist() == [0, 1, 2, 3, 1, 5, 1, 7]


def seeded_pair(o, b, direct_batch, info, seed, **direct):
    """The objective's step and direct_step on a copy of it, under the same torch seed."""
    ref = copy.deepcopy(o)
    torch.manual_seed(seed)
    with torch.no_grad():
        out = o(b, info)
    torch.manual_seed(seed)
    with torch.no_grad():
        return out, direct_step(ref, direct_batch, info, **direct)


def test_uniform_and_word_swap_itm_negatives_match_a_direct_computation():
    """The filter options beyond the official code: uniformly drawn ITM negatives (itm_hard_from=None),
    never of the same image, and each pair's word-swapped caption as one more negative."""
    o = tiny_retrieval(queue_size=8, itm_hard_from=None)
    b = dict(batch([1, 5, 1, 7], seed=2), neg_text=["a blue shape number 1", None, "a red shape", None])
    out, (loss_ita, loss_itm, neg_img, neg_txt) = seeded_pair(o, b, b, StepInfo(0, 2, 4), 3, uniform=True)
    assert torch.allclose(out["loss_itm"], loss_itm, atol=1e-5)
    assert torch.allclose(out["loss_ita"], loss_ita, atol=1e-5)
    ids = b["image_id"]
    assert not (ids[neg_img] == ids).any() and not (ids[neg_txt] == ids).any()
    # mined from step 5 on, swaps from step 9 on: at step 6 the official hard negatives, without the swaps
    o = tiny_retrieval(queue_size=8, itm_hard_from=5, itm_swap_from=9)
    plain = {k: v for k, v in b.items() if k != "neg_text"}
    out, (_, loss_itm, _, _) = seeded_pair(o, b, plain, StepInfo(1, 2, 4), 4)
    assert torch.allclose(out["loss_itm"], loss_itm, atol=1e-5)


def test_word_swap_weight_matches_a_direct_computation():
    """itm_swap_weight: each word-swap negative weighs that much in ITM's mean, the other pairs 1."""
    from blip.train.config import TrainConfig
    b = dict(batch([1, 5, 1, 7], seed=2), neg_text=["a blue shape number 1", None, "a red shape", None])
    o = tiny_retrieval(queue_size=8, itm_hard_from=None, itm_swap_weight=0.25)
    out, (_, loss_itm, _, _) = seeded_pair(o, b, b, StepInfo(0, 2, 4), 3, uniform=True, swap_weight=0.25)
    assert torch.allclose(out["loss_itm"], loss_itm, atol=1e-5)
    o = tiny_retrieval(queue_size=8, itm_hard_from=None)
    _, (_, unweighted, _, _) = seeded_pair(o, b, b, StepInfo(0, 2, 4), 3, uniform=True)
    assert not torch.allclose(unweighted, loss_itm, atol=1e-4)
    with pytest.raises(ValueError, match="itm_swap_weight"):
        TrainConfig(task="retrieval", itm_swap_weight=0.5)  # no word swaps to weigh
    with pytest.raises(ValueError, match="itm_swap_weight"):
        TrainConfig(task="pretrain", itm_swap_words="synthetic", itm_swap_weight=0.5)
    assert TrainConfig(task="retrieval", itm_swap_words="synthetic", itm_swap_weight=0.5).itm_swap_weight == 0.5


def test_negative_pool_texts_match_a_direct_computation(tmp_path):
    """negative_pool: every image of the batch also meets a text drawn from a pool of other images' texts
    (the web pairs a filter will score) as one more ITM negative; the pool is cleaned as captions are."""
    from blip.train.tasks.retrieval import load_negative_pool
    web = [{"image": "a.png", "caption": "IMG_0042.JPG"}, {"image": "b.png", "caption": ["Click here!", " "]},
           {"image": "c.png", "caption": "a green shape number 9"}]
    (tmp_path / "web.json").write_text(json.dumps(web))
    pool = load_negative_pool(tmp_path / "web.json")
    assert pool == ["img_0042 jpg", "click here", "a green shape number 9"]
    assert load_negative_pool(["A B", "c"]) == ["a b", "c"]
    (tmp_path / "bad.json").write_text("[{")
    for bad, message in ((tmp_path / "none.json", "not found"), ([], "no text"), ([{"caption": 3}], "caption list"),
                         (tmp_path / "bad.json", "not a JSON file")):
        with pytest.raises((ValueError, FileNotFoundError), match=message):
            load_negative_pool(bad)
    o = tiny_retrieval(queue_size=8, itm_hard_from=None, negative_pool=str(tmp_path / "web.json"))
    b = dict(batch([1, 5, 1, 7], seed=2), neg_text=["a blue shape number 1", None, "a red shape", None])
    out, (loss_ita, loss_itm, _, _) = seeded_pair(o, b, b, StepInfo(0, 2, 4), 3, uniform=True, pool=pool)
    assert torch.allclose(out["loss_itm"], loss_itm, atol=1e-5)
    assert torch.allclose(out["loss_ita"], loss_ita, atol=1e-5)
    plain = tiny_retrieval(queue_size=8, itm_hard_from=None)
    torch.manual_seed(3)
    with torch.no_grad():
        assert not torch.allclose(plain(b, StepInfo(0, 2, 4))["loss_itm"], loss_itm, atol=1e-3)
    # negative_pool_draws: each image meets that many pool texts a step
    o = tiny_retrieval(queue_size=8, itm_hard_from=None, negative_pool=str(tmp_path / "web.json"),
                       negative_pool_draws=3)
    out, (_, loss_itm3, _, _) = seeded_pair(o, b, b, StepInfo(0, 2, 4), 3, uniform=True, pool=pool, pool_draws=3)
    assert torch.allclose(out["loss_itm"], loss_itm3, atol=1e-5)
    assert not torch.allclose(loss_itm3, loss_itm, atol=1e-4)


def test_replaced_token_detection_on_the_word_swaps_matches_a_direct_computation():
    """rtd (the filter option, as in pretraining): every token of a word-swapped caption but [ENC] through the
    ITM head, the swapped-in word labelled "no match" and the rest "match", the two kinds averaged apart."""
    b = dict(batch([1, 5, 1, 7], seed=2), neg_text=["a blue shape number 1", None, "a green shape", None])
    out = {}
    for rtd in (0.0, 0.5):
        o = tiny_retrieval(queue_size=8, itm_hard_from=None, rtd=rtd)
        torch.manual_seed(3)
        with torch.no_grad():
            out[rtd] = o(b, StepInfo(0, 2, 4))
    assert "loss_rtd" not in out[0.0]
    assert torch.allclose(out[0.5]["loss_itm"], out[0.0]["loss_itm"], atol=1e-6)  # rtd adds, changes nothing else
    m = o.model
    s_ids, s_mask = get_tokenizer()(["a blue shape number 1", "a green shape"], max_length=35)
    s_ids[:, 0] = ENC_ID
    with torch.no_grad():
        states = m.text_encoder(s_ids, s_mask, m.visual_encoder(b["image"])[[0, 2]], mode="multimodal")
        logits = m.itm_head(states)
    # row 0: "blue" (token 2) put in for "red"; row 1 ("a green shape" for "a green shape number 1"): nothing put in
    replaced = logits[0, 2:3]
    kept = torch.cat([logits[0, [1, 3, 4, 5, 6]], logits[1, 1:5]])
    want = 0.5 * F.cross_entropy(replaced, torch.zeros(1, dtype=torch.long)) + \
        0.5 * F.cross_entropy(kept, torch.ones(len(kept), dtype=torch.long))
    assert torch.allclose(out[0.5]["loss_rtd"], want, atol=1e-5)
    assert torch.allclose(out[0.5]["loss"], out[0.0]["loss"] + 0.5 * want, atol=1e-5)


def test_retrieval_collate_passes_word_swaps_on():
    from blip.train.tasks.retrieval import Collate
    item = {"image": torch.zeros(3, 4, 4), "text": "a red circle", "image_id": 0}
    assert "neg_text" not in Collate()([item, item])
    out = Collate()([dict(item, neg_text="a blue circle"), dict(item, neg_text=None)])
    assert out["neg_text"] == ["a blue circle", None]


def test_alpha_ramps_over_epoch_zero_only():
    o = tiny_retrieval(queue_size=8)
    assert o.alpha_ramp_epochs == 1.0
    with torch.no_grad():
        alphas = [o(batch([0, 1, 2, 3]), StepInfo(e, s, 4))["alpha"] for e, s in [(0, 0), (0, 2), (1, 0), (2, 3)]]
    assert alphas == [0.0, 0.2, 0.4, 0.4]
    assert ramped_alpha(0.4, 0, 3, 4, 1.0) == pytest.approx(0.3)


def test_queue_must_be_a_multiple_of_the_global_batch():
    model = blip.create_model("tiny", task="retrieval")
    with pytest.raises(ValueError, match="multiple of the global batch 6"):
        build_objective("retrieval", model, queue_size=16, batch_size=6)
    with pytest.raises(ValueError, match="retrieval"):
        build_objective("retrieval", blip.create_model("tiny", task="caption"), queue_size=8)


# ------------------------------------------------------------------------------ evaluation
def official_scores(model, images, texts, k):
    """train_retrieval.evaluation, loop for loop (image states repeated per text)."""
    ids, mask = get_tokenizer()(texts, max_length=35, padding="max_length")
    t = F.normalize(model.text_proj(model.text_encoder(ids, mask, mode="text")[:, 0]), dim=-1)
    ids[:, 0] = ENC_ID
    states = model.visual_encoder(model.pixels(images))
    sims = F.normalize(model.vision_proj(states[:, 0]), dim=-1) @ t.T
    i2t = torch.full(sims.shape, -100.0)
    for i, row in enumerate(sims):
        top, idx = row.topk(k)
        out = model.text_encoder(ids[idx], mask[idx], states[i].repeat(k, 1, 1), mode="multimodal")
        i2t[i, idx] = model.itm_head(out[:, 0])[:, 1] + top
    t2i = torch.full(sims.T.shape, -100.0)
    for j, row in enumerate(sims.T):
        top, idx = row.topk(k)
        out = model.text_encoder(ids[j].repeat(k, 1), mask[j].repeat(k, 1), states[idx], mode="multimodal")
        t2i[j, idx] = model.itm_head(out[:, 0])[:, 1] + top
    return i2t, t2i


def make_test_set(folder, n=6, caps=2):
    entries = []
    for i in range(n):
        Image.new("RGB", (40, 40), (40 * i, 90 + 20 * (i % 3), 200 - 30 * i)).save(folder / f"{i}.png")
        entries.append({"image": f"{i}.png", "caption": [f"a picture number {i} of a {c}" for c in
                                                         ["dog", "red car", "small house"][:caps]]})
    (folder / "test.json").write_text(json.dumps(entries))
    return folder / "test.json"


@torch.inference_mode()
def test_rerank_equals_the_official_loop_and_the_bounded_paths(hf_dirs, tmp_path):
    model = blip.load(hf_dirs["retrieval"][0])
    images, texts, txt2img, img2txt = ev.load_retrieval_annotation(make_test_set(tmp_path, n=6, caps=3))
    want_i2t, want_t2i = official_scores(model, images, texts, k=4)
    i2t, t2i = ev.retrieval_scores(model, images, texts, k_test=4, batch_size=4)
    assert torch.allclose(i2t, want_i2t, atol=1e-4) and torch.allclose(t2i, want_t2i, atol=1e-4)
    assert ev.recall_at_k(i2t, t2i, txt2img, img2txt) == ev.recall_at_k(want_i2t, want_t2i, txt2img, img2txt)
    # states spilled to a file, several images per pass with padded rows, tiny blocks: the same numbers
    spilled = ev.retrieval_scores(model, images, texts, k_test=4, batch_size=2, itm_rows=3, max_state_bytes=0,
                                  state_dir=tmp_path)
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(spilled, (i2t, t2i)))
    one_by_one = ev.retrieval_scores(model, images, texts, k_test=4, itm_rows=2, kv_bytes=1)  # one image per block
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(one_by_one, (i2t, t2i)))
    assert not list(tmp_path.glob("blip-states-*"))  # the file is gone
    # passes of <= 4 rows: an image's texts split in chunks, equal-width chunks of several images together
    assert ev._itm_passes([5, 2, 2, 1], 4) == [[(0, 0, 4)], [(1, 0, 2), (2, 0, 2)], [(0, 4, 1), (3, 0, 1)]]


DRIVER = textwrap.dedent('''
    import sys
    import torch
    import blip
    from blip.eval import retrieval as ev
    from blip.train import distributed as dist
    dist.setup("cpu")
    torch.set_num_threads(1)
    model = blip.load(sys.argv[1], device="cpu")
    images, texts, _, _ = ev.load_retrieval_annotation(sys.argv[2])
    i2t, t2i = ev.retrieval_scores(model, images, texts, k_test=3, batch_size=2, distributed=True)
    if dist.rank() == 0:
        torch.save({"i2t": i2t, "t2i": t2i, "world": dist.world_size()}, sys.argv[3])
    # and two finetuning steps with ITM negatives drawn from both ranks' batches
    from blip.train.config import TrainConfig
    from blip.train.loop import Trainer
    cfg = TrainConfig.load(None, ["task=retrieval", "model=tiny", "image_size=32", f"train_files={sys.argv[4]}",
                                  "batch_size=2", "queue_size=8", "steps_per_epoch=2", "negatives_all_rank=true",
                                  "progress=false", "ckpt_interval=0", "log_interval=1", "device=cpu",
                                  f"val_file={sys.argv[2]}", 'eval_options={"k_test": 3, "batch_size": 2}'])
    trainer = Trainer(cfg, sys.argv[5])
    trainer.train()
    torch.save({"params": {k: v.detach() for k, v in trainer.model.named_parameters()},
                "ids": trainer.objective.momentum.idx_queue.clone()}, f"{sys.argv[5]}/rank{dist.rank()}.pt")
    dist.cleanup()
''')


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_ranks_score_like_one_and_train_with_all_rank_negatives(hf_dirs, tmp_path):
    script = tmp_path / "driver.py"
    script.write_text(DRIVER)
    data = make_test_set(tmp_path, n=5, caps=2)  # 5 images: the ranks get 3 and 2
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    train, _ = write_train_set(tmp_path)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--nnodes=1",
           f"--master_port={free_port()}", str(script), str(hf_dirs["retrieval"][0]), str(data), str(tmp_path / "r.pt"),
           str(train), str(tmp_path / "run")]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    got = torch.load(tmp_path / "r.pt", weights_only=True)
    model = blip.load(hf_dirs["retrieval"][0])
    images, texts, _, _ = ev.load_retrieval_annotation(data)
    i2t, t2i = ev.retrieval_scores(model, images, texts, k_test=3, batch_size=2)
    assert got["world"] == 2
    assert torch.allclose(got["i2t"], i2t, atol=1e-5) and torch.allclose(got["t2i"], t2i, atol=1e-5)
    # all-rank negatives: DDP kept the ranks equal, and the id queue holds both ranks' image ids of both steps
    r0, r1 = (torch.load(tmp_path / "run" / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert all(torch.equal(r0["params"][k], r1["params"][k]) for k in r0["params"])
    assert torch.equal(r0["ids"], r1["ids"]) and (r0["ids"] >= 0).all()
    # validation ran on both ranks (retrieval splits its work) and scored as one process scores the exported model
    best = json.loads((tmp_path / "run" / "best.json").read_text())
    trained = blip.load(tmp_path / "run" / "model", task="retrieval")
    one = ev.evaluate(trained, data, k_test=3, batch_size=2)
    assert best["metrics"].keys() == one.keys()
    assert all(abs(best["metrics"][k] - one[k]) < 1e-6 for k in one)


def test_evaluate_cli_and_bad_files(hf_dirs, tmp_path, capsys):
    from blip.cli import main
    data = make_test_set(tmp_path, n=4)
    assert main(["evaluate", "--task", "retrieval", "--data", str(data), "--model", str(hf_dirs["retrieval"][0]),
                 "--k-test", "3", "--json", "--quiet", "--out", str(tmp_path / "out")]) == 0
    out = json.loads(capsys.readouterr().out)
    six = [out[f"{d}@{k}"] for d in ("tr", "ir") for k in (1, 5, 10)]
    assert out["ir@10"] == 100.0 and out["r_mean"] == pytest.approx(sum(six) / 6)
    assert json.loads((tmp_path / "out" / "metrics.json").read_text()) == out
    (tmp_path / "vqa.json").write_text(json.dumps([{"image": "0.png", "question": "what?", "answer": ["x"]}]))
    assert main(["evaluate", "--task", "retrieval", "--data", str(tmp_path / "vqa.json"),
                 "--model", str(hf_dirs["retrieval"][0]), "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "entry 0" in err[0] and "caption" in err[0]


# ------------------------------------------------------------------------------ finetuning end to end
def write_train_set(folder, n=8):
    (folder / "img").mkdir(exist_ok=True)
    train, test = [], []
    for i in range(n):
        Image.new("RGB", (48, 48), (30 * i, 250 - 30 * i, 80)).save(folder / "img" / f"{i}.png")
        caps = [f"a {c} picture {i}" for c in ("green", "bright")]
        train += [{"image": f"img/{i}.png", "caption": c, "image_id": f"im{i}"} for c in caps]
        test.append({"image": f"img/{i}.png", "caption": caps})
    (folder / "train.json").write_text(json.dumps(train))
    (folder / "val.json").write_text(json.dumps(test))
    return folder / "train.json", folder / "val.json"


def finetune_config(folder, **extra):
    train, val = write_train_set(folder)
    cfg = {"task": "retrieval", "model": "tiny", "image_size": 32, "train_files": [str(train)], "val_file": str(val),
           "test_file": str(val), "batch_size": 4, "queue_size": 8, "epochs": 2, "steps_per_epoch": 2,
           "schedule": "cosine", "init_lr": 1e-4, "min_lr": 0, "alpha_ramp_epochs": 1, "max_length": 35,
           "min_scale": 0.5, "progress": False, "log_interval": 1, "ckpt_interval": 0, "device": "cpu",
           "eval_options": {"k_test": 4}, **extra}
    (folder / "cfg.json").write_text(json.dumps(cfg))
    return folder / "cfg.json"


def test_finetune_cli_validates_and_exports_the_best(tmp_path, capsys):
    from blip.cli import main
    cfg = finetune_config(tmp_path)
    assert main(["finetune", "--task", "retrieval", "--config", str(cfg), "--out", str(tmp_path / "run")]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    best = json.loads((tmp_path / "run" / "best.json").read_text())
    assert best["rule"] == ev.RULE and best["epoch"] in (0, 1) and result["best"]["score"] == best["score"]
    rows = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    vals = [r for r in rows if "val" in r]
    assert len(vals) == 2 and all(0 <= r["val"]["r_mean"] <= 100 and r["val_score"] == r["val"]["r_mean"] for r in vals)
    assert all({"loss_ita", "loss_itm"} <= set(r) for r in rows if "loss" in r)
    model = blip.load(tmp_path / "run" / "model")
    assert model.config.task == "retrieval"
    assert set(model.match(str(tmp_path / "img" / "0.png"), ["a"])) == {"itm", "itc"}
    assert json.loads((tmp_path / "run" / "test.json").read_text())["r_mean"] == result["test"]["r_mean"]


@pytest.mark.parametrize("problem, message", [
    ("missing_file", "train file not found"),
    ("vqa", "no \"caption\" text"),
    ("missing_image", "1 of 8 training images do not exist"),
    ("not_json", "train.json is not a JSON file"),
])
def test_bad_training_data_is_one_line(tmp_path, capsys, problem, message):
    from blip.cli import main
    cfg = finetune_config(tmp_path)
    train = tmp_path / "train.json"
    if problem == "missing_file":
        train.unlink()
    elif problem == "not_json":
        train.write_text("image,caption\n0.png,a dog\n")
    elif problem == "vqa":
        train.write_text(json.dumps([{"image": "img/0.png", "question": "what?", "answer": ["x"]}]))
    else:
        (tmp_path / "img" / "3.png").unlink()
    assert main(["finetune", "--task", "retrieval", "--config", str(cfg), "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("blip: error:") and message in err[0]


def test_init_checkpoint_momentum_and_queues_are_loaded(tmp_path):
    """As the official load_checkpoint: an official pretrained .pth's momentum encoders and queues start
    the objective's (its image size interpolated), not copies of the online model."""
    from blip.train.config import TrainConfig
    from blip.train.loop import Trainer, flat_state_dict
    torch.manual_seed(0)
    pre = build_objective("pretrain", blip.create_model("tiny", task="pretrain"), queue_size=8, queue_init="random")
    sd = flat_state_dict(pre)
    with torch.no_grad():
        for k in sd:
            if k.startswith(("visual_encoder_m.", "text_proj_m.")):
                sd[k] = sd[k] + 0.5  # momentum weights that differ from the online ones
    torch.save({"model": sd}, tmp_path / "model_base.pth")
    cfg = TrainConfig.load(finetune_config(tmp_path, init=str(tmp_path / "model_base.pth"), image_size=48,
                                           val_file=None, test_file=None))
    trainer = Trainer(cfg, tmp_path / "run")
    try:
        mo = trainer.objective.momentum
        assert torch.equal(mo.text_proj_m.weight, sd["text_proj_m.weight"])
        assert not torch.equal(mo.text_proj_m.weight, trainer.model.text_proj.weight)
        assert mo.visual_encoder_m.pos_embed.shape == trainer.model.visual_encoder.pos_embed.shape == (1, 10, 64)
        assert torch.equal(mo.image_queue, sd["image_queue"]) and torch.equal(mo.text_queue, sd["text_queue"])
        assert mo.idx_queue.eq(-100).all() and int(mo.queue_ptr) == 0
    finally:
        trainer.close()


def test_negative_pool_is_a_retrieval_option():
    from blip.train.config import TrainConfig
    assert TrainConfig(task="retrieval", negative_pool="web.json").negative_pool == "web.json"
    with pytest.raises(ValueError, match="negative_pool is an option of retrieval"):
        TrainConfig(task="caption", negative_pool="web.json")
