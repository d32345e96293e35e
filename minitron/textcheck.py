"""Is a corpus text? Three cheap checks on the first SAMPLE_CHARS characters of its documents, with the teacher's
tokenizer, run in preflight before any model work (random bytes named `.txt` once ran every stage and failed in
evaluation two minutes later).

Measured on 64 KB samples (SmolLM2's BPE / the byte tokenizer of tiny-random-llama): English prose, wikitext, German
and Python code have no unprintable characters and no byte-fallback tokens, and 52-87% of their tokens carry letters;
200 KB of random bytes has 56% unprintable characters, 51-72% byte-fallback tokens and 11-21% letter tokens; a
column of numbers has 0% letter tokens; Chinese through SmolLM2's English tokenizer is 79% byte fallbacks.
"""

from __future__ import annotations

import unicodedata

from minitron.errors import UserError

SAMPLE_CHARS = 65_536  # how much of the corpus is looked at: the first documents, up to this many characters
MAX_UNPRINTABLE = 0.05  # above this fraction of control/format/unassigned characters (or U+FFFD), it is binary
MAX_BYTE_FALLBACK = 0.5  # above this fraction of tokens that are bare bytes, the tokenizer does not know the text
MIN_LETTER_TOKENS = 0.25  # below this fraction of tokens that carry a letter, it is numbers or symbols, not text


def sample_text(documents, chars: int = SAMPLE_CHARS) -> str:
    """The first `chars` characters of a stream of documents (one newline between documents)."""
    parts, size = [], 0
    for doc in documents:
        parts.append(doc)
        size += len(doc) + 1
        if size >= chars:
            break
    return "\n".join(parts)[:chars]


def _unprintable(c: str) -> bool:
    return c == "\ufffd" or (unicodedata.category(c)[0] == "C" and c not in "\n\r\t")


def check_text(text: str, tokenizer, where: str) -> None:
    """One-line UserError when `text` (a corpus sample) does not look like text the tokenizer reads."""
    if not text.strip():
        raise UserError(f"{where} has no text (empty files or an empty text field): point it at a text corpus")
    bad = sum(map(_unprintable, text)) / len(text)
    if bad > MAX_UNPRINTABLE:
        raise UserError(f"{where} does not look like text: {bad:.0%} of the characters of its first "
                        f"{len(text) // 1024} KB are not printable (binary data?): point it at a text corpus")
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    pieces = {i: tokenizer.decode([i]) for i in set(ids)}
    fallback = sum("\ufffd" in pieces[i] for i in ids) / max(1, len(ids))
    if fallback > MAX_BYTE_FALLBACK:
        raise UserError(f"{where} does not look like text this teacher reads: {fallback:.0%} of its tokens are "
                        "byte fallbacks (a script or encoding its tokenizer does not know): point it at text in a "
                        "language the teacher was trained on")
    letters = sum(any(c.isalpha() for c in pieces[i]) for i in ids) / max(1, len(ids))
    if letters < MIN_LETTER_TOKENS:
        raise UserError(f"{where} does not look like text: only {letters:.0%} of its tokens carry letters (numbers "
                        f"or symbols; text has over {MIN_LETTER_TOKENS:.0%}): point it at a text corpus")
