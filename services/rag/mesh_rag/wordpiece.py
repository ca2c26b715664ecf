"""BERT uncased WordPiece tokenizer in pure Python, so the RAG service needs no `tokenizers` wheel.

It reproduces what the Hugging Face fast tokenizer of all-MiniLM-L6-v2 does (``BertNormalizer`` +
``BertPreTokenizer`` + ``WordPiece``), because the embedding model only gives the published vectors
for the exact ids it was trained with:

1. special tokens written literally in the text (``[CLS]``, ``[SEP]``, ...) are kept whole;
2. clean: drop NUL, U+FFFD and control characters, map every whitespace character to a space;
3. put spaces around CJK ideographs (each one becomes a word);
4. strip accents (NFD, drop non-spacing marks) and lowercase;
5. split on whitespace, and split off every punctuation character as a word of its own;
6. greedy longest-match-first WordPiece with ``##`` continuations; a word with no full match,
   or longer than 100 characters, becomes ``[UNK]``.
"""

from __future__ import annotations

import re
import unicodedata
from functools import lru_cache
from pathlib import Path

SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
_SPECIAL = re.compile("(" + "|".join(re.escape(t) for t in SPECIAL_TOKENS) + ")")
MAX_CHARS_PER_WORD = 100


def _is_control(ch: str) -> bool:
    return ch not in "\t\n\r" and unicodedata.category(ch) in ("Cc", "Cf", "Co", "Cs")


def _is_punctuation(ch: str) -> bool:
    cp = ord(ch)
    if 33 <= cp <= 47 or 58 <= cp <= 64 or 91 <= cp <= 96 or 123 <= cp <= 126:
        return True  # BERT treats every non-alphanumeric ASCII as punctuation ($, ^, `, ...)
    return unicodedata.category(ch).startswith("P")


def _is_cjk(cp: int) -> bool:
    return (
        0x4E00 <= cp <= 0x9FFF
        or 0x3400 <= cp <= 0x4DBF
        or 0x20000 <= cp <= 0x2A6DF
        or 0x2A700 <= cp <= 0x2B73F
        or 0x2B740 <= cp <= 0x2B81F
        or 0x2B920 <= cp <= 0x2CEAF  # sic: the reference tokenizer skips U+2B820..U+2B91F
        or 0xF900 <= cp <= 0xFAFF
        or 0x2F800 <= cp <= 0x2FA1F
    )


def normalize(text: str) -> str:
    """Steps 2-4: clean, space out CJK, strip accents, lowercase."""
    out: list[str] = []
    for ch in text:
        cp = ord(ch)
        if cp == 0 or cp == 0xFFFD or _is_control(ch):
            continue
        if ch.isspace():
            out.append(" ")
        elif _is_cjk(cp):
            out.append(f" {ch} ")
        else:
            out.append(ch)
    decomposed = unicodedata.normalize("NFD", "".join(out))
    stripped = "".join(ch for ch in decomposed if unicodedata.category(ch) != "Mn")
    if "\u03a3" in stripped:  # lowercase char by char like the reference: no word-final sigma rule
        return "".join(ch.lower() for ch in stripped)
    return stripped.lower()


def basic_tokenize(text: str) -> list[str]:
    """Steps 2-5: the words WordPiece sees."""
    words: list[str] = []
    for piece in normalize(text).split():
        start = 0
        for i, ch in enumerate(piece):
            if _is_punctuation(ch):
                if start < i:
                    words.append(piece[start:i])
                words.append(ch)
                start = i + 1
        if start < len(piece):
            words.append(piece[start:])
    return words


class WordPiece:
    """Text -> BERT input ids (``[CLS] ... [SEP]``), from a ``vocab.txt`` with one token per line."""

    def __init__(self, vocab: dict[str, int]) -> None:
        self.vocab = vocab
        self.unk_id = vocab["[UNK]"]
        self.cls_id = vocab["[CLS]"]
        self.sep_id = vocab["[SEP]"]
        self.pad_id = vocab["[PAD]"]
        self._word_ids = lru_cache(maxsize=65536)(self._word_ids_uncached)

    @classmethod
    def from_file(cls, path: str | Path) -> WordPiece:
        lines = Path(path).read_text(encoding="utf-8").split("\n")
        if lines and lines[-1] == "":
            lines.pop()
        return cls({token: i for i, token in enumerate(lines)})

    def _word_ids_uncached(self, word: str) -> tuple[int, ...]:
        if len(word) > MAX_CHARS_PER_WORD:
            return (self.unk_id,)
        ids: list[int] = []
        start = 0
        while start < len(word):
            end = len(word)
            while end > start:
                piece = word[start:end] if start == 0 else "##" + word[start:end]
                found = self.vocab.get(piece)
                if found is not None:
                    ids.append(found)
                    break
                end -= 1
            else:
                return (self.unk_id,)  # one unmatched piece makes the whole word unknown
            start = end
        return tuple(ids)

    def tokenize_ids(self, text: str) -> list[int]:
        """Ids of the text's word pieces, without ``[CLS]``/``[SEP]``."""
        ids: list[int] = []
        for i, segment in enumerate(_SPECIAL.split(text)):
            if i % 2:  # a literal special token, matched before any normalisation
                ids.append(self.vocab[segment])
            else:
                for word in basic_tokenize(segment):
                    ids.extend(self._word_ids(word))
        return ids

    def encode(self, text: str, max_length: int = 256) -> list[int]:
        """``[CLS] pieces [SEP]``, the pieces truncated so the whole fits in ``max_length``."""
        return [self.cls_id, *self.tokenize_ids(text)[: max(max_length - 2, 0)], self.sep_id]

    def tokens(self, text: str) -> list[str]:
        """The word-piece strings (for debugging and tests)."""
        inverse = {i: t for t, i in self.vocab.items()}
        return [inverse[i] for i in self.tokenize_ids(text)]
