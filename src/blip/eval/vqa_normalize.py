"""VQA accuracy as the official VQA evaluation (`vqaEval.py` of the VQA API) computes it.

No maintained PyPI package ships just this (lmms-eval has a copy inside a large framework), so it
lives here. The official rules, including their quirks:

- answers: newlines and tabs become spaces, then strip;
- normalisation runs only when the human answers of a question are not all the same string;
  it is punctuation (removed, or made a space), periods not followed by a digit removed, lower
  case, number words "none".."ten" as digits, articles dropped, missing apostrophes restored;
- a question scores the mean, over its leave-one-out subsets of human answers (10 choose 9 in
  VQA v2), of min(1, humans in the subset that gave the prediction / 3), compared in lower case.

Beyond the official code (which assumes 10 answers): with fewer answers the bar of 3 humans drops
to the subset's size, so a prediction every annotator agrees with scores 1, and a question with a
single answer (VG, the synthetic corpus) scores exact match.
"""
from __future__ import annotations

import re

_PUNCT = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",",
          "?", "!")
_COMMA_DIGIT = re.compile(r"(\d)(,)(\d)")
_PERIOD = re.compile(r"\.(?!\d)")
_NUMBERS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
            "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
_ARTICLES = {"a", "an", "the"}
# the contractions the official table restores; each is matched written without any one of its apostrophes
_CONTRACTED = (
    "ain't aren't can't could've couldn't couldn't've didn't doesn't don't hadn't hadn't've hasn't haven't "
    "he'd he'd've he's how'd how'll how's isn't it'd it'd've it'll ma'am mightn't mightn't've might've "
    "mustn't must've needn't not've o'clock oughtn't 'ow's'at shan't she'd've should've shouldn't "
    "shouldn't've somebody'd've somebody'll somebody's someone'd someone'd've someone'll someone's "
    "something'd something'd've something'll that's there'd there'd've there're there's they'd they'd've "
    "they'll they're they've 'twas wasn't we'd've we've weren't what'll what're what's what've when's "
    "where'd where's where've who'd who'd've who'll who's who've why'll why're why's won't would've "
    "wouldn't wouldn't've y'all y'all'll y'all'd've you'd you'd've you'll you're you've").split()
_CONTRACTIONS = {w[:i] + w[i + 1:]: w for w in _CONTRACTED for i, c in enumerate(w) if c == "'"}
_CONTRACTIONS["somebody'd"] = "somebodyd"  # sic: the official table maps this one the other way


def process_punctuation(text: str) -> str:
    """A punctuation mark next to a space (or any mark, when the text has a digit,digit) is removed,
    others become a space; then periods not followed by a digit go."""
    out = text
    drop = _COMMA_DIGIT.search(text) is not None
    for p in _PUNCT:
        out = out.replace(p, "" if drop or p + " " in text or " " + p in text else " ")
    return _PERIOD.sub("", out, count=32)  # the official passes re.UNICODE (32) as the count


def process_digit_article(text: str) -> str:
    words = [_NUMBERS.get(w, w) for w in text.lower().split()]
    return " ".join(_CONTRACTIONS.get(w, w) for w in words if w not in _ARTICLES)


def normalize_answer(text: str) -> str:
    """The official normalisation of one answer (whitespace, punctuation, digits, articles, contractions)."""
    return _normalize(_whitespace(text))


def _normalize(text: str) -> str:
    return process_digit_article(process_punctuation(text))


def _whitespace(text: str) -> str:
    return text.replace("\n", " ").replace("\t", " ").strip()


def vqa_accuracy(prediction: str, answers: list[str]) -> float:
    """One question's VQA accuracy in [0, 1] against its human answers."""
    if not answers:
        raise ValueError("a question needs at least one human answer to score")
    gts, pred = [_whitespace(a) for a in answers], _whitespace(prediction)
    if len(set(gts)) > 1:
        gts, pred = [_normalize(a) for a in gts], _normalize(pred)
    gts, pred = [a.lower() for a in gts], pred.lower()
    if len(gts) == 1:
        return float(gts[0] == pred)
    bar = min(3, len(gts) - 1)
    matches = sum(a == pred for a in gts)
    # leaving out a matching answer leaves matches - 1 matching others, leaving out another leaves matches
    held_out = [matches - (a == pred) for a in gts]
    return sum(min(1.0, m / bar) for m in held_out) / len(gts)
