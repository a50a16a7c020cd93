"""Trimmed vocabularies: a model that keeps only the tokens its corpus uses.

Why: BLIP's text towers carry bert-base-uncased's 30524-token embedding table, and its LM head scores all
30524 tokens at every position. For a small model on a small corpus that head is most of the decoder's
cost (the embedded default's corpus uses a few hundred tokens). Trimming keeps the tokenizer and every
token id as they are; only the embedding rows and head rows of the kept ids remain (`TextConfig.vocab_ids`).
Text with other tokens reads them as [UNK], and generation never emits them.

`corpus_token_ids(files)` collects the ids the texts of annotation files use; `trim(model, ids)` returns
the model with only those rows (and the special tokens); `unknown_share` says how much of some text a
trimmed model would read as [UNK].
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable, Iterator

import torch

from .config import BlipConfig
from .tokenizer import CLS_ID, DEC_ID, ENC_ID, MASK_ID, PAD_ID, SEP_ID, UNK_ID, BlipTokenizer, pre_caption

SPECIAL_IDS = (PAD_ID, UNK_ID, CLS_ID, SEP_ID, MASK_ID, DEC_ID, ENC_ID)
TEXT_FIELDS = ("caption", "question", "answer", "sentence", "text")  # the official annotation formats' texts
_ROW_KEYS = ("word_embeddings.weight", "predictions.bias", "predictions.decoder.weight", "predictions.decoder.bias")


CORPUS_FILES = ("pretrain.json", "clean_train.json", "vqa_train.json", "nlvr_train.json", "answer_list.json")


def corpus_files(folder: str | Path) -> list[Path]:
    """The train splits' annotation files of a corpus folder (blip data synth's layout) that it has: what
    a vocabulary for pretraining and every later finetune on that corpus is made from."""
    return [Path(folder) / name for name in CORPUS_FILES if (Path(folder) / name).exists()]


def corpus_override(folder: str | Path) -> str:
    """The `vocab_from=[...]` training override that points a trimming config at this corpus's files."""
    return "vocab_from=" + json.dumps([str(p.resolve()) for p in corpus_files(folder)])


def corpus_texts(files: Iterable[str | Path]) -> Iterator[str]:
    """Every text of JSON annotation files: the TEXT_FIELDS of each entry (a string or a list of them),
    or the entries themselves for a list of strings (e.g. a VQA answer_list.json)."""
    for f in files:
        try:
            data = json.loads(Path(f).read_text())
        except (OSError, ValueError) as e:
            raise ValueError(f"cannot read the annotation file {f}: {e}") from None
        if not isinstance(data, list):
            raise ValueError(f"{f}: expected a JSON list of annotations")
        for entry in data:
            if isinstance(entry, str):
                yield entry
            elif isinstance(entry, dict):
                for key in TEXT_FIELDS:
                    value = entry.get(key)
                    for text in ([value] if isinstance(value, str) else value if isinstance(value, list) else []):
                        if isinstance(text, str):
                            yield text


def _encode(texts: Iterable[str], tokenizer: BlipTokenizer | None, batch: int = 4096) -> Iterator[list[int]]:
    tok = tokenizer or BlipTokenizer()
    chunk: list[str] = []
    for text in texts:
        chunk += [text, pre_caption(text)]  # as written and as the captioning code cleans it
        if len(chunk) >= batch:
            yield from tok.encode_batch(chunk)
            chunk = []
    if chunk:
        yield from tok.encode_batch(chunk)


def corpus_token_ids(files: Iterable[str | Path], tokenizer: BlipTokenizer | None = None) -> list[int]:
    """Sorted ids of the special tokens and of every token the files' texts use."""
    ids = set(SPECIAL_IDS)
    for row in _encode(corpus_texts(files), tokenizer):
        ids.update(row)
    return sorted(ids)


def unknown_share(config: BlipConfig, texts: Iterable[str], tokenizer: BlipTokenizer | None = None) -> float:
    """Share of the texts' tokens (specials not counted) that the config's vocabulary lacks; 0 if untrimmed."""
    if config.text.vocab_ids is None:
        return 0.0
    kept, lacking, total = set(config.text.vocab_ids), 0, 0
    for row in _encode(texts, tokenizer):
        words = [i for i in row if i not in SPECIAL_IDS]
        total += len(words)
        lacking += sum(i not in kept for i in words)
    return lacking / total if total else 0.0


def trim(model, ids: Iterable[int], build=None):
    """`model` rebuilt with only the embedding and LM-head rows of `ids` (and of the special tokens and the
    captioning prompt's words);
    every other weight is kept as it is. Ids the model already lacks stay out. `build(config)` makes the
    model (default: blip.factory.build)."""
    from .checkpoint import load_into
    from .factory import build as default_build

    cfg = model.config
    have = cfg.text.vocab_ids if cfg.text.vocab_ids is not None else range(cfg.text.vocab_size)
    prompt = BlipTokenizer().encode(cfg.prompt) if cfg.prompt else []  # the captioning prompt's words
    keep = sorted(set(int(i) for i in ids).union(SPECIAL_IDS, prompt).intersection(have))
    position = {t: r for r, t in enumerate(have)}
    rows = torch.tensor([position[t] for t in keep], dtype=torch.long)
    sd = {k: v.index_select(0, rows.to(v.device)) if k.endswith(_ROW_KEYS) else v
          for k, v in model.state_dict().items()}
    data = cfg.to_dict()
    data["text"]["vocab_ids"] = keep
    new_cfg = BlipConfig.from_dict(data)
    device = next(model.parameters()).device
    with torch.device("meta"):  # every weight comes from sd
        new = (build or default_build)(new_cfg)
    load_into(new, sd, strict=True)
    return new.to(device)


def untrimmed_state_dict(model, sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`sd` (the state dict of `model`) with all vocab_size rows, for formats without a trimmed vocabulary
    (the official .pth, transformers): an id the model lacks gets [UNK]'s embedding (how the model reads it)
    and an LM-head bias of -1e4 (never generated), so the model behaves the same in the other code."""
    from .med import _id_rows
    ids = model.config.text.vocab_ids
    if ids is None:
        return sd
    rows = _id_rows(model.config.text)  # id -> row, as the model reads ids
    lacking = torch.ones(model.config.text.vocab_size, dtype=torch.bool)
    lacking[torch.tensor(ids)] = False
    out = {}
    for k, v in sd.items():
        if k.endswith(_ROW_KEYS):
            v = v.index_select(0, rows.to(v.device))
            if k.endswith(("predictions.bias", "predictions.decoder.bias")):
                v = v.masked_fill(lacking.to(v.device), -1e4)
        out[k] = v
    return out
