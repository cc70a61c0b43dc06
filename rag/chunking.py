"""Cut a document into chunks of about ``size`` tokens (tiktoken, counted offline).

A chunk never spans two sections. Inside a section the cut falls between paragraphs when it
can, else between sentences, else between words; never inside a word (a single "word" longer
than a whole chunk, such as a pasted blob, is the one exception). Each chunk after the first of
a section starts with the last ~``overlap`` tokens of the previous one, from a word boundary.
CSV rows are never split: rows are packed whole, a row longer than ``size`` stays one chunk.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from core.tokens import count_text
from rag.extract import Document, Section

SEPARATOR = " > "
_SENTENCE_END = re.compile(r"(?<=[.!?。！？])\s+|\n+")
_WORD = re.compile(r"\S+")


@dataclass(frozen=True, slots=True)
class Chunk:
    index: int
    text: str
    section: str
    tokens: int


def chunk(doc: Document, *, size: int = 500, overlap: int = 50) -> list[Chunk]:
    if size < 10:
        raise ValueError("size must be at least 10 tokens")
    overlap = max(0, min(overlap, size // 2))
    out: list[Chunk] = []
    for path, kind, texts in _groups(doc):
        section = SEPARATOR.join(path)
        if kind == "row":
            pieces = _pack_rows(texts, size)
        else:
            pieces = _pack(_atoms("\n\n".join(texts), size, kind), size, overlap)
        for text in pieces:
            out.append(Chunk(len(out), text, section, count_text(text)))
    return out


def _groups(doc: Document) -> list[tuple[tuple[str, ...], str, list[str]]]:
    """Consecutive sections of the same path and kind, merged (rows stay rows)."""
    groups: list[tuple[tuple[str, ...], str, list[str]]] = []
    for s in doc:
        text = s.text.strip()
        if not text:
            continue
        kind = "row" if s.kind == "row" else "text"
        if groups and groups[-1][0] == s.path and groups[-1][1] == kind:
            groups[-1][2].append(text)
        else:
            groups.append((s.path, kind, [text]))
    return groups


def _pack_rows(rows: list[str], size: int) -> list[str]:
    chunks: list[str] = []
    current: list[str] = []
    used = 0
    for row in rows:
        n = count_text(row)
        if current and used + n + 1 > size:
            chunks.append("\n".join(current))
            current, used = [], 0
        current.append(row)
        used += n + (1 if len(current) > 1 else 0)
    if current:
        chunks.append("\n".join(current))
    return chunks


# An atom is a piece no larger than a chunk, with the separator that joins it to the previous one.
Atom = tuple[str, int, str]


def _atoms(text: str, size: int, kind: str) -> list[Atom]:
    atoms: list[Atom] = []
    for para in re.split(r"\n\s*\n", text):
        para = para.strip()
        if not para:
            continue
        n = count_text(para)
        if n <= size:
            atoms.append((para, n, "\n\n"))
            continue
        first = True
        for sentence in _SENTENCE_END.split(para):
            sentence = sentence.strip()
            if not sentence:
                continue
            m = count_text(sentence)
            parts = [(sentence, m)] if m <= size else _split_words(sentence, size)
            for part, tokens in parts:
                atoms.append((part, tokens, "\n\n" if first else " "))
                first = False
    return atoms


def _split_words(text: str, size: int) -> list[tuple[str, int]]:
    parts: list[tuple[str, int]] = []
    words: list[str] = []
    used = 0
    for word in _WORD.findall(text):
        n = count_text(word)
        if n > size:  # a blob with no spaces: the only place a cut falls inside a "word"
            if words:
                parts.append((" ".join(words), count_text(" ".join(words))))
                words, used = [], 0
            parts.extend(_split_blob(word, size))
            continue
        if words and used + n + 1 > size:
            joined = " ".join(words)
            parts.append((joined, count_text(joined)))
            words, used = [], 0
        words.append(word)
        used += n + 1
    if words:
        joined = " ".join(words)
        parts.append((joined, count_text(joined)))
    return parts


def _split_blob(word: str, size: int) -> list[tuple[str, int]]:
    parts = []
    step = max(1, size * 2)  # characters; at least ~2 per token for dense text
    start = 0
    while start < len(word):
        piece = word[start : start + step]
        while count_text(piece) > size and len(piece) > 1:
            piece = piece[: len(piece) * 3 // 4]
        parts.append((piece, count_text(piece)))
        start += len(piece)
    return parts


def _pack(atoms: list[Atom], size: int, overlap: int) -> list[str]:
    chunks: list[str] = []
    i = 0
    while i < len(atoms):
        prefix = _tail(chunks[-1], overlap) if chunks and overlap else ""
        head_tokens = count_text(prefix) if prefix else 0
        if prefix and head_tokens + atoms[i][1] + 1 > size:
            prefix, head_tokens = "", 0
        taken: list[Atom] = []
        used = head_tokens
        j = i
        while j < len(atoms):
            text, tokens, _ = atoms[j]
            cost = tokens + (1 if taken or prefix else 0)
            if taken and used + cost > size:
                break
            taken.append(atoms[j])
            used += cost
            j += 1
        text = _join(prefix, taken)
        while count_text(text) > size:  # separators merged differently than counted: back off
            if len(taken) > 1:
                taken.pop()
                j -= 1
            elif prefix:
                prefix = ""
            else:
                break
            text = _join(prefix, taken)
        chunks.append(text)
        i = j
    return chunks


def _join(prefix: str, atoms: list[Atom]) -> str:
    text = prefix
    for piece, _, sep in atoms:
        text = f"{text}{sep}{piece}" if text else piece
    return text


def _tail(text: str, overlap: int) -> str:
    """The shortest-start suffix of ``text`` beginning at a word that fits in ``overlap`` tokens."""
    starts = [m.start() for m in _WORD.finditer(text)]
    if len(starts) < 2:
        return ""
    lo, hi = 1, len(starts) - 1  # never the whole text: that would repeat the chunk
    if count_text(text[starts[hi] :]) > overlap:
        return ""
    while lo < hi:
        mid = (lo + hi) // 2
        if count_text(text[starts[mid] :]) <= overlap:
            hi = mid
        else:
            lo = mid + 1
    return text[starts[lo] :]


__all__ = ["Chunk", "Section", "chunk"]
