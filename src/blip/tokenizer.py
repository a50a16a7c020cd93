"""bert-base-uncased WordPiece with BLIP's two extra tokens, through `tokenizers`.

The official code builds `BertTokenizer('bert-base-uncased')` and then adds `[DEC]` (bos, id 30522)
and `[ENC]` (id 30523) in that order; the vocabulary ships inside this package so nothing is
downloaded.
"""
from __future__ import annotations

import re
from importlib import resources

import torch
from tokenizers import Tokenizer, decoders, normalizers, pre_tokenizers, processors
from tokenizers.models import WordPiece

PAD_ID, UNK_ID, CLS_ID, SEP_ID, MASK_ID = 0, 100, 101, 102, 103
DEC_ID, ENC_ID = 30522, 30523

_PUNCT = re.compile(r"([.!\"()*#:;~])")
_SURROGATE = re.compile(r"[\ud800-\udfff]")


def as_texts(texts) -> list[str]:
    """A string or a sequence of strings as a non-empty list. Lone surrogates (what Python makes of
    command-line bytes that are not UTF-8) become U+FFFD ([UNK]): `tokenizers` refuses them with a TypeError."""
    texts = [texts] if isinstance(texts, str) else texts
    if not isinstance(texts, (list, tuple)) or not all(isinstance(t, str) for t in texts):
        raise TypeError(f"texts must be a string or a list of strings, got {repr(texts)[:60]}")
    if not texts:
        raise ValueError("give at least one text")
    return [_SURROGATE.sub("\ufffd", t) for t in texts]


def pre_caption(caption: str, max_words: int = 50) -> str:
    """The official caption cleaning: lowercase, punctuation to spaces, squeeze, cut to max_words."""
    caption = _PUNCT.sub(" ", caption.lower())
    caption = re.sub(r"\s{2,}", " ", caption).rstrip("\n").strip(" ")
    words = caption.split(" ")
    return " ".join(words[:max_words]) if len(words) > max_words else caption


def pre_question(question: str, max_words: int = 50) -> str:
    """The official VQA question cleaning: lowercase, punctuation removed, cut to max_words."""
    question = _PUNCT.sub("", question.lower()).rstrip(" ")
    words = question.split(" ")
    return " ".join(words[:max_words]) if len(words) > max_words else question


def vocab_path() -> str:
    return str(resources.files("blip") / "assets" / "bert-base-uncased-vocab.txt")


class BlipTokenizer:
    """Text to padded id tensors. `__call__` returns (input_ids, attention_mask), both (B, T)."""

    pad_token_id, cls_token_id, sep_token_id = PAD_ID, CLS_ID, SEP_ID
    bos_token_id, enc_token_id = DEC_ID, ENC_ID

    def __init__(self, vocab_file: str | None = None):
        tok = Tokenizer(WordPiece.from_file(vocab_file or vocab_path(), unk_token="[UNK]",
                                            max_input_chars_per_word=100))
        tok.normalizer = normalizers.BertNormalizer(clean_text=True, handle_chinese_chars=True,
                                                    strip_accents=None, lowercase=True)
        tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        tok.post_processor = processors.TemplateProcessing(
            single="[CLS] $A [SEP]", special_tokens=[("[CLS]", CLS_ID), ("[SEP]", SEP_ID)])
        tok.decoder = decoders.WordPiece(prefix="##")
        tok.add_special_tokens(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[DEC]", "[ENC]"])
        if tok.token_to_id("[DEC]") != DEC_ID or tok.token_to_id("[ENC]") != ENC_ID:
            raise ValueError("vocabulary does not give [DEC]=30522 and [ENC]=30523: not bert-base-uncased?")
        self._tok = tok

    def __len__(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        if not isinstance(text, str):
            raise TypeError(f"text must be a string, got {repr(text)[:60]}")
        return self._tok.encode(as_texts(text)[0], add_special_tokens=add_special_tokens).ids

    def encode_batch(self, texts: list[str], add_special_tokens: bool = True) -> list[list[int]]:
        """Unpadded, untruncated ids of many texts (e.g. to collect a corpus's vocabulary: blip.vocab)."""
        return [e.ids for e in self._tok.encode_batch(as_texts(texts), add_special_tokens=add_special_tokens)]

    def __call__(self, texts: str | list[str], max_length: int | None = None, padding: str = "longest",
                 first_token: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Tokenise a batch like `tokenizer(texts, padding=..., truncation=True, max_length=...)`.

        padding: "longest" or "max_length". first_token replaces [CLS] (ENC_ID for the image-grounded
        encoder, DEC_ID for the decoder), as the official models do after tokenising.
        """
        texts = as_texts(texts)
        if padding not in ("longest", "max_length"):
            raise ValueError("padding must be 'longest' or 'max_length'")
        encodings = self._tok.encode_batch(texts)
        seqs = []
        for enc in encodings:
            ids = enc.ids
            if max_length is not None and len(ids) > max_length:
                ids = ids[: max_length - 1] + [SEP_ID]  # truncation keeps the closing [SEP]
            seqs.append(ids)
        width = max_length if (padding == "max_length" and max_length) else max(len(s) for s in seqs)
        input_ids = torch.full((len(seqs), width), PAD_ID, dtype=torch.long)
        mask = torch.zeros((len(seqs), width), dtype=torch.long)
        for i, ids in enumerate(seqs):
            input_ids[i, : len(ids)] = torch.tensor(ids, dtype=torch.long)
            mask[i, : len(ids)] = 1
        if first_token is not None:
            input_ids[:, 0] = first_token
        return input_ids, mask

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def batch_decode(self, rows, skip_special_tokens: bool = True) -> list[str]:
        return [self.decode(r, skip_special_tokens) for r in rows]


_DEFAULT: BlipTokenizer | None = None


def get_tokenizer() -> BlipTokenizer:
    """The shared default tokenizer (built once; building reads a 30k-line vocabulary)."""
    global _DEFAULT
    if _DEFAULT is None:
        _DEFAULT = BlipTokenizer()
    return _DEFAULT
