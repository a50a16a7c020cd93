"""Print the speed tables of docs/speed.md from benchmarks/results/*.json (run the benchmarks first);
`--readme` writes them into docs/speed.md in place of the tables there (the CPU one under its
"| target |" header, the CUDA one under "| measure |")."""
from __future__ import annotations

import json
import sys
from pathlib import Path

R = Path(__file__).parent / "results"
README = Path(__file__).parent.parent / "docs" / "speed.md"  # the tables live there; the README links to it


def load(name):
    p = R / f"{name}.json"
    return json.loads(p.read_text()) if p.exists() else None


def caption_rows(cap: dict, label: str = "", goals: bool = True) -> list[str]:
    """Table rows of one caption_speed result (`label` prefixes each row; without goals they read "recorded")."""
    goal = (lambda g: g) if goals else (lambda g: "recorded")  # noqa: E731
    rows = []
    if "image_encoder_ratio" in cap:
        vit = cap["image_encoder_s"]
        unit = (lambda x: f"{x * 1e3:.1f} ms") if vit["ours"] < 0.1 else (lambda x: f"{x:.2f} s")  # noqa: E731
        rows.append(f"| {label}image encoder alone (fp32) | {unit(vit['ours'])} | {unit(vit['transformers'])} | "
                    f"{cap['image_encoder_ratio']:.2f}x | {goal('(bounds greedy/sample end to end)')} |")
    for mode, t in cap["targets"].items():
        if mode.startswith("bf16"):
            dt = t.get("dtype", "bf16-full" if mode == "bf16_beam3" else "bf16")  # older result files
            rows.append(f"| {label}captioning beam-3, ours {dt} vs transformers fp32 | "
                        f"{t.get('ours_images_per_s', 0):.2f} img/s | | "
                        f"{t['end_to_end_ratio_vs_transformers_fp32']:.2f}x | {goal('>= 3.5x')} |")
            if "image_embedding_min_cosine_to_fp32" in t:
                rows.append(f"| {label}{dt} image embedding cosine to fp32 (min) | "
                            f"{t['image_embedding_min_cosine_to_fp32']:.5f} | | | {goal('>= 0.999')} |")
            continue
        rows.append(f"| {label}captioning {mode}, end to end (tokens identical: {t['tokens_identical']}) | "
                    f"{t['ours_images_per_s']:.2f} img/s | {t['transformers_images_per_s']:.2f} img/s | "
                    f"{t['end_to_end_ratio']:.2f}x | {goal('>= 1.5x')} |")
        if "ours_decoding_s" in t:
            ms = t["ours_decoding_s"] < 1
            unit = (lambda x: f"{x * 1e3:.0f} ms") if ms else (lambda x: f"{x:.2f} s")  # noqa: E731
            rows.append(f"| {label}captioning {mode}, decoding part | {unit(t['ours_decoding_s'])} | "
                        f"{unit(t['transformers_decoding_s'])} | {t['decoding_ratio']:.2f}x | {goal('>= 4x')} |")
    return rows


def cuda_table() -> list[str]:
    """The same benchmarks run with --device cuda (caption_speed_cuda*.json, vit_roof_cuda.json), if any:
    the table alone (`cuda_cards` names the cards it was measured on)."""
    rows = []
    for path in sorted(R.glob("caption_speed_cuda*.json")):
        cap = json.loads(path.read_text())
        rows += caption_rows(cap, label=f"{cap['images']} images, ", goals=False)
    roof = load("vit_roof_cuda")
    if roof:
        for dt, t in roof["targets"].items():
            rows.append(f"| ViT forward / its matmuls alone ({dt}) | {t['forward_s'] * 1e3:.1f} ms | "
                        f"{t['matmuls_s'] * 1e3:.1f} ms (matmuls) | {t['ratio']:.2f}x | recorded |")
    return _table("measure", rows) if rows else []


def cuda_cards() -> str:
    cards = {json.loads(p.read_text())["machine"].get("cuda") for p in R.glob("*_cuda*.json")}
    return ", ".join(sorted(c for c in cards if c))


def _table(first: str, rows: list[str]) -> list[str]:
    return [f"| {first} | ours | transformers | ratio | goal |", "|---|---|---|---|---|", *rows]


def replace_table(text: str, table: list[str]) -> str:
    """`text` with the Markdown table that starts with `table`'s header line replaced by `table`."""
    start = text.index(table[0] + "\n")
    end = text.find("\n\n", start)
    end = len(text) if end < 0 else end + 1
    return text[:start] + "\n".join(table) + "\n" + text[end:]


def cpu_table() -> list[str]:
    rows = []
    cap = load("caption_speed")
    extra = load("caption_speed_bf16")
    if cap and extra:  # a bf16-only rerun (--modes "" --name caption_speed_bf16) replaces the bf16 rows
        cap["targets"] = {k: v for k, v in cap["targets"].items() if not k.startswith("bf16")}
        cap["targets"].update(extra["targets"])
    if cap:
        rows += caption_rows(cap)
    one = load("caption_speed_1image")  # --images 1 --name caption_speed_1image: what one photo costs
    if one:
        for mode, t in one["targets"].items():
            if mode.startswith("bf16"):
                rows.append(f"| one image, beam-3, ours {t['dtype']} vs transformers fp32 | {t['ours_images_per_s']:.2f} img/s | | "
                            f"{t['end_to_end_ratio_vs_transformers_fp32']:.2f}x | recorded |")
                continue
            rows.append(f"| one image, {mode}, end to end (decoding part) | {t['ours_images_per_s']:.2f} img/s | "
                        f"{t['transformers_images_per_s']:.2f} img/s | {t['end_to_end_ratio']:.2f}x "
                        f"({t['decoding_ratio']:.2f}x) | recorded |")
    bq = load("bf16_quality")
    if bq:
        for dt in ("bf16", "bf16-full", "bf16-vision"):
            if dt in bq:
                rows.append(f"| captions identical to fp32, {dt} (trained synthetic model, {bq['images']} images) | "
                            f"{bq[dt]['identical_captions_pct']:.1f}% | | | >= 95% |")
    roof = load("vit_roof")
    if roof:
        for dt, t in roof["targets"].items():
            rows.append(f"| ViT forward / its matmuls alone ({dt}) | {t['forward_s']:.2f} s | {t['matmuls_s']:.2f} s (matmuls) | "
                        f"{t['ratio']:.2f}x | <= 1.25x |")
    match = load("match_speed")
    if match:
        rows.append(f"| match 1 image x {match['texts']} texts / sum of parts | {match['match_s']:.2f} s | "
                    f"{match['parts_s']:.2f} s (parts) | {match['match_over_parts']:.2f}x | <= 1.2x |")
        rows.append(f"| match pairs/s | {match['ours_pairs_per_s']:.1f} | {match['transformers_pairs_per_s']:.2f} | "
                    f"{match['speedup_vs_transformers']:.1f}x | recorded |")
    mem = load("caption_memory")
    if mem:
        rows.append(f"| peak memory, captioning 8 images beam-3 | {mem['ours']['peak_mib']:.0f} MiB | "
                    f"{mem['transformers']['peak_mib']:.0f} MiB | {mem['peak_ratio_ours_over_transformers']:.2f}x | <= 1x |")
    load_ = load("load_speed")
    if load_:
        rows.append(f"| load a `base` checkpoint (our format) | {load_['median_s']:.2f} s | | | < 2 s |")
        if "fresh_process_median_s" in load_:
            rows.append(f"| load a `base` checkpoint, fresh process (after importing torch) | "
                        f"{load_['fresh_process_median_s']:.2f} s | | | < 2 s |")
    pipe = load("image_pipeline")
    if pipe:
        d = pipe["decode"]
        hf = f"{d['transformers_images_per_s']:.1f} img/s"
        rows.append(f"| decode + resize 12-MP JPEGs, one thread (pixels identical: "
                    f"{d['max_abs_pixel_difference'] == 0}) | {d['ours_1_thread_images_per_s']:.1f} img/s | "
                    f"{hf} | {d['ours_1_thread_vs_transformers']:.2f}x | recorded |")
        rows.append(f"| decode + resize 12-MP JPEGs, {pipe['threads']} threads | "
                    f"{d['ours_threads_images_per_s']:.1f} img/s | {hf} | "
                    f"{d['ours_threads_vs_transformers']:.2f}x | recorded |")
        if "caption" in pipe:
            c = pipe["caption"]
            rows.append(f"| caption {pipe['images']} photos (greedy), decoding threads vs none | "
                        f"{c['threads_images_per_s']:.2f} img/s | {c['serial_images_per_s']:.2f} img/s (none) | "
                        f"{c['threads_speedup']:.2f}x | recorded |")
    return _table("target", rows)


def main() -> None:
    cpu, cuda = cpu_table(), cuda_table()
    if "--readme" in sys.argv[1:]:
        text = replace_table(README.read_text(), cpu)
        README.write_text(replace_table(text, cuda) if cuda else text)
    print("\n".join(cpu + (["", f"On CUDA ({cuda_cards()}):", "", *cuda] if cuda else [])))


if __name__ == "__main__":
    main()
