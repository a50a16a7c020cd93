"""The report of `blip reproduce`: report.json (every figure), report.md and one self-contained report.html
(the Table-1 rows, loss curves, the filter's ITM-probability histograms per noise kind, its ROC curve and
AUC against the corpus's noise labels, precision/recall at the threshold, the noise ratio before and after,
and a grid of example images with web text, synthetic caption and kept/dropped)."""
from __future__ import annotations

import base64
import html
import io
import json
from pathlib import Path

import numpy as np


# ------------------------------------------------------------------------------ filter statistics
def auc(pos: np.ndarray, neg: np.ndarray) -> float:
    """P(score of a positive > score of a negative), ties counted half (the Mann-Whitney form of ROC AUC)."""
    if len(pos) == 0 or len(neg) == 0:
        return float("nan")
    scores = np.concatenate([pos, neg])
    order = scores.argsort(kind="mergesort")
    ranks = np.empty(len(scores))
    ranks[order] = np.arange(1, len(scores) + 1)
    for v in np.unique(scores):  # average ranks of ties
        tie = scores == v
        ranks[tie] = ranks[tie].mean()
    return float((ranks[: len(pos)].sum() - len(pos) * (len(pos) + 1) / 2) / (len(pos) * len(neg)))


def roc_curve(pos: np.ndarray, neg: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(false positive rate, true positive rate) over every threshold, positives = scores >= threshold."""
    thresholds = np.unique(np.concatenate([pos, neg, [np.inf]]))[::-1]
    tpr = np.array([(pos >= t).mean() for t in thresholds])
    fpr = np.array([(neg >= t).mean() for t in thresholds])
    return fpr, tpr


def filter_stats(web: list[dict], threshold: float) -> dict | None:
    """How well the filter's ITM probability tells noisy web pairs (positives: score 1 - itm) from clean
    ones; None without noise labels."""
    labelled = [r for r in web if r.get("noise")]
    if not labelled or not any(r["noise"] != "clean" for r in labelled):
        return None
    noisy = np.array([1 - r["itm"] for r in labelled if r["noise"] != "clean"])
    clean = np.array([1 - r["itm"] for r in labelled if r["noise"] == "clean"])
    kinds = sorted({r["noise"] for r in labelled} - {"clean"})
    by_kind = {k: auc(np.array([1 - r["itm"] for r in labelled if r["noise"] == k]), clean) for k in kinds}
    dropped = [r for r in labelled if r["itm"] < threshold]
    noisy_n = sum(r["noise"] != "clean" for r in labelled)
    true_drops = sum(r["noise"] != "clean" for r in dropped)
    return {"auc": auc(noisy, clean), "auc_by_kind": by_kind, "threshold": threshold,
            "precision": true_drops / len(dropped) if dropped else float("nan"),  # of the dropped, noisy
            "recall": true_drops / noisy_n,                                         # of the noisy, dropped
            "kept_by_kind": {k: float(np.mean([r["itm"] >= threshold for r in labelled if r["noise"] == k]))
                             for k in ["clean", *kinds]}}


def captioner_accuracy(synthetic: list[dict], corpus: Path) -> dict | None:
    """The synthetic captions against the corpus's scene ground truth (metadata.json), when there is one."""
    meta = corpus / "metadata.json"
    if not meta.exists():
        return None
    from ..data.synth_quality import caption_correct
    scenes = {p["key"]: p["scene"] for p in json.loads(meta.read_text()).get("pretrain", []) if "key" in p}
    scored = [caption_correct(r["text"], scenes[r["key"]]) for r in synthetic if r.get("key") in scenes]
    scored = [s for s in scored if s["scored"]]
    if not scored:
        return None
    rate = {kind: [s["correct"] for s in scored if s["scored"] == kind] for kind in ("single", "two_larger")}
    return {"attribute_accuracy": 100.0 * float(np.mean([s["correct"] for s in scored if s["scored"] == "single"]
                                                       or [np.nan])),
            "attribute_accuracy_two_larger": 100.0 * float(np.mean(rate["two_larger"] or [np.nan])),
            "scored_images": len(scored),
            "_rule": "right colour and shape of the object (one-object images) / of the large object (two objects)"}


# ------------------------------------------------------------------------------ figures
def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    import matplotlib.pyplot as plt
    plt.close(fig)
    return buf.getvalue()


def _plt():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def loss_figure(logs: dict[str, list[dict]]) -> bytes:
    plt = _plt()
    names = ("loss_ita", "loss_itm", "loss_lm")
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.2))
    for ax, name in zip(axes, names):
        for label, rows in logs.items():
            pts = [(r["step"], r[name]) for r in rows if r.get(name)]
            if pts:
                ax.plot(*zip(*pts), lw=1.4, label=label)
        ax.set_title(name.replace("loss_", "").upper())
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle("pretraining losses per row", fontsize=10)
    fig.tight_layout()
    return _png(fig)


def filter_figure(web: list[dict], threshold: float) -> bytes:
    plt = _plt()
    kinds = ["clean", *sorted({r["noise"] for r in web if r.get("noise")} - {"clean"})]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 3.6))
    bins = np.linspace(0, 1, 26)
    for k in kinds:
        ax1.hist([r["itm"] for r in web if r.get("noise") == k], bins=bins, histtype="step", lw=1.6, label=k,
                 density=True)
    ax1.axvline(threshold, ls="--", c="gray", lw=1)
    ax1.set_xlabel("filter ITM probability of the web text")
    ax1.set_title("per noise kind")
    ax1.legend(fontsize=8)
    clean = np.array([1 - r["itm"] for r in web if r.get("noise") == "clean"])
    for k in kinds[1:]:
        fpr, tpr = roc_curve(np.array([1 - r["itm"] for r in web if r.get("noise") == k]), clean)
        ax2.plot(fpr, tpr, lw=1.4, label=k)
    fpr, tpr = roc_curve(np.array([1 - r["itm"] for r in web if r.get("noise") not in (None, "clean")]), clean)
    ax2.plot(fpr, tpr, lw=2.2, c="k", label="all noise")
    ax2.plot([0, 1], [0, 1], ls=":", c="gray")
    ax2.set_xlabel("clean pairs dropped (FPR)")
    ax2.set_ylabel("noisy pairs dropped (TPR)")
    ax2.set_title("ROC: noisy vs clean")
    ax2.legend(fontsize=8)
    fig.tight_layout()
    return _png(fig)


def _thumb(path: str, size: int = 96) -> str:
    from PIL import Image
    with Image.open(path) as im:
        im = im.convert("RGB")
        im.thumbnail((size, size))
        buf = io.BytesIO()
        im.save(buf, format="JPEG", quality=85)
    return base64.b64encode(buf.getvalue()).decode()


def examples(audit: list[dict], n: int = 12) -> list[dict]:
    """The first n web images with their web text, first synthetic caption, and what was kept."""
    by_key: dict[str, dict] = {}
    for r in audit:
        e = by_key.setdefault(r["key"], {"key": r["key"], "image": r["image"], "noise": r.get("noise")})
        if r["source"] == "web":
            e.update(web=r["text"], web_itm=r["itm"], web_kept=r["kept"])
        elif "synthetic" not in e:
            e.update(synthetic=r["text"], synthetic_itm=r["itm"], synthetic_kept=r["kept"])
    keys = sorted(by_key)
    # a mix: noisy ones first so the grid shows what the filter does
    chosen = [k for k in keys if by_key[k].get("noise") not in (None, "clean")][: n // 2]
    chosen += [k for k in keys if k not in chosen][: n - len(chosen)]
    return [by_key[k] for k in sorted(chosen)]


# ------------------------------------------------------------------------------ the report
def _fmt(v, nd=1):
    return "-" if v is None or (isinstance(v, float) and v != v) else (f"{v:.{nd}f}" if isinstance(v, float) else str(v))


def with_noise_kinds(audit: list[dict]) -> list[dict]:
    """The audit's rows with "noise" as a kind name ("clean" or the noise kind), None where unlabelled (the
    audit holds noise as a bool and the kind apart)."""
    out = []
    for r in audit:
        kind = None if r.get("noise") is None else ((r.get("noise_kind") or "noisy") if r["noise"] else "clean")
        out.append(dict(r, noise=kind))
    return out


def write_report(pipeline, rows: list[dict], capfilt: Path | None) -> dict:
    from ..train.plots import read_log
    out, opts = pipeline.out, pipeline.o
    minutes_file = out / "minutes.json"
    minutes = json.loads(minutes_file.read_text()) if minutes_file.exists() else {}
    minutes.update(pipeline.minutes)
    minutes_file.write_text(json.dumps(minutes, indent=2))
    report: dict = {"corpus": str(opts.corpus), "seed": opts.seed, "quick": opts.quick,
                    "rows": [{"name": r["name"], "row": r["row"], "retrieval": r["retrieval"], "caption": r["caption"]}
                             for r in rows], "minutes": minutes}
    if getattr(pipeline, "pretrained_probe", None):
        report["pretrained"] = pipeline.pretrained_probe
    figures: dict[str, bytes] = {}
    logs = {r["name"]: read_log(out / f"pretrain_{r['row']}" / "log.jsonl") for r in rows
            if (out / f"pretrain_{r['row']}" / "log.jsonl").exists()}
    if logs:
        figures["losses"] = loss_figure(logs)
    grid = []
    if capfilt is not None:
        import pyarrow.parquet as pq
        audit = with_noise_kinds(pq.read_table(capfilt / "audit.parquet").to_pylist())
        summary = json.loads((capfilt / "summary.json").read_text())
        threshold = float(summary.get("threshold", summary.get("args", {}).get("threshold", 0.5)))
        web = [r for r in audit if r["source"] == "web"]
        stats = filter_stats(web, threshold)
        if stats:
            report["filter"] = stats
            figures["filter"] = filter_figure(web, threshold)
        labelled = [r for r in web if r.get("noise")]
        if labelled:
            kept = [r for r in labelled if r["kept"]]
            report["noise_ratio"] = {"before": float(np.mean([r["noise"] != "clean" for r in labelled])),
                                     "after": float(np.mean([r["noise"] != "clean" for r in kept])) if kept else None}
        cap = captioner_accuracy([r for r in audit if r["source"] == "synthetic"], opts.corpus)
        if cap:
            report["captioner"] = cap
        report["bootstrap"] = {k: v for k, v in summary.items() if not isinstance(v, (list, dict)) or k == "kept"}
        grid = examples(audit)
    (out / "report.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    for name, png in figures.items():
        (out / f"{name}.png").write_bytes(png)
    (out / "report.md").write_text(_markdown(report, figures, grid))
    (out / "report.html").write_text(_html(report, figures, grid))
    return report


def _table(report: dict) -> list[list[str]]:
    head = ["row", "TR@1", "IR@1", "TR@5", "IR@5", "CIDEr", "BLEU-4"]
    body = [[r["name"], *(_fmt(r["retrieval"].get(k)) for k in ("tr@1", "ir@1", "tr@5", "ir@5")),
             _fmt(r["caption"].get("cider"), 3), _fmt(r["caption"].get("bleu_4"), 3)]
            for r in report["rows"]]
    return [head, *body]


def _facts(report: dict) -> list[str]:
    lines = []
    f = report.get("filter")
    if f:
        kinds = ", ".join(f"{k} {v:.3f}" for k, v in f["auc_by_kind"].items())
        lines.append(f"Filter AUC (noisy vs clean web pairs): {f['auc']:.3f}; per kind: {kinds}.")
        lines.append(f"At ITM threshold {f['threshold']}: precision {f['precision']:.3f} (dropped pairs that are "
                     f"noisy), recall {f['recall']:.3f} (noisy pairs dropped); kept fraction per kind: "
                     + ", ".join(f"{k} {v:.2f}" for k, v in f["kept_by_kind"].items()) + ".")
    nr = report.get("noise_ratio")
    if nr:
        lines.append(f"Noise ratio of the web texts: {_fmt(nr['before'], 3)} before, {_fmt(nr['after'], 3)} "
                     "after filtering.")
    c = report.get("captioner")
    if c:
        lines.append(f"Synthetic captions naming the right colour and shape of the main object: "
                     f"{_fmt(c['attribute_accuracy'])}% of one-object images, "
                     f"{_fmt(c['attribute_accuracy_two_larger'])}% of two-object ones ({c['scored_images']} scored).")
    q = report.get("pretrained")
    if q and "itm_attribute_accuracy" in q:
        r = q.get("retrieval_itc", {})
        lines.append(f"The first pretrained model (test split, scene ground truth): ITM prefers the true caption to one "
                     f"with an attribute changed {_fmt(q['itm_attribute_accuracy'])}% of the time "
                     f"(by attribute: {q.get('itm_by_attribute')}; the decoder's caption likelihood ranks the same "
                     f"pairs right {_fmt(q.get('lm_attribute_accuracy'))}% of the time); zero-shot ITC TR@1/IR@1 "
                     f"{_fmt(r.get('tr@1'))}/"
                     f"{_fmt(r.get('ir@1'))}; greedy captions name the right colour and shape in "
                     f"{_fmt(q.get('caption_single'))}% of one-object and {_fmt(q.get('caption_two_larger'))}% of "
                     f"two-object images.")
    lines.append("Minutes per stage: " + ", ".join(f"{k} {v}" for k, v in report["minutes"].items()) + ".")
    return lines


def _markdown(report: dict, figures: dict, grid: list[dict]) -> str:
    t = _table(report)
    md = ["# blip reproduce: CapFilt on " + html.escape(report["corpus"]), "",
          "| " + " | ".join(t[0]) + " |", "|" + "---|" * len(t[0])]
    md += ["| " + " | ".join(r) + " |" for r in t[1:]]
    md += ["", "Zero-shot retrieval on the test split (ITC + ITM rerank of the top 16); captioning after the same "
           "short finetune on the clean pairs (beam search 3, pycocoevalcap).", ""]
    md += [f"- {x}" for x in _facts(report)]
    for name in figures:
        md += ["", f"![{name}]({name}.png)"]
    if grid:
        md += ["", "| image | web text | kept | synthetic caption | kept |", "|---|---|---|---|---|"]
        md += [f"| {g['key']} | {g.get('web', '')} ({g.get('noise') or '?'}) | {'yes' if g.get('web_kept') else 'no'} "
               f"| {g.get('synthetic', '')} | {'yes' if g.get('synthetic_kept') else 'no'} |" for g in grid]
    return "\n".join(md) + "\n"


def _html(report: dict, figures: dict, grid: list[dict]) -> str:
    t = _table(report)
    e = html.escape
    rows = "".join("<tr>" + "".join(f"<td>{e(c)}</td>" for c in r) + "</tr>" for r in t[1:])
    imgs = "".join(f'<p><img alt="{e(n)}" src="data:image/png;base64,{base64.b64encode(p).decode()}"></p>'
                   for n, p in figures.items())
    cells = []
    for g in grid:
        try:
            src = f"data:image/jpeg;base64,{_thumb(g['image'])}"
        except OSError:
            src = ""
        cells.append(f'<div class="ex"><img src="{src}"><p class="{"k" if g.get("web_kept") else "d"}">web: '
                     f'{e(str(g.get("web", "")))} <small>({e(str(g.get("noise") or "?"))}, itm '
                     f'{_fmt(g.get("web_itm"), 2)})</small></p><p class="{"k" if g.get("synthetic_kept") else "d"}">'
                     f'synthetic: {e(str(g.get("synthetic", "")))} <small>(itm {_fmt(g.get("synthetic_itm"), 2)})'
                     f'</small></p></div>')
    facts = "".join(f"<li>{e(x)}</li>" for x in _facts(report))
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>blip reproduce</title><style>
body{{font-family:sans-serif;max-width:1100px;margin:2em auto}}table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:4px 10px;text-align:right}}td:first-child{{text-align:left}}
.grid{{display:flex;flex-wrap:wrap;gap:10px}}.ex{{width:250px;font-size:12px}}.k{{color:#064}}
.d{{color:#a00;text-decoration:line-through}}</style></head><body>
<h1>CapFilt on {e(report["corpus"])}</h1><table><tr>{"".join(f"<th>{e(h)}</th>" for h in t[0])}</tr>{rows}</table>
<ul>{facts}</ul>{imgs}<h2>Examples (green: kept, struck out: dropped)</h2><div class="grid">{"".join(cells)}</div>
</body></html>
"""
