"""Text out of an uploaded file, keeping its structure: headings become a section path, tables
stay readable as "column: value" rows, every CSV row is one unit carrying its header.

``extract`` detects the type from the file's first bytes, then its name, then the declared
content type; it bounds the work (pages, characters, uncompressed size) and fails with an
``ExtractionError`` whose message a person can act on.
"""

from __future__ import annotations

import csv
import io
import re
import zipfile
from dataclasses import dataclass
from html.parser import HTMLParser
from pathlib import Path
from typing import Literal

MAX_PAGES = 2_000
MAX_CHARS = 5_000_000
MAX_UNZIPPED = 200 * 1024 * 1024  # a DOCX whose parts inflate past this is refused (zip bombs)
MAX_ROWS = 200_000  # rows of a CSV file (each one a section until chunks pack them)

Kind = Literal["text", "table", "row"]
TYPES = ("pdf", "docx", "txt", "md", "csv", "html")


@dataclass(frozen=True, slots=True)
class Section:
    path: tuple[str, ...]
    text: str
    kind: Kind = "text"


Document = list[Section]


class ExtractionError(Exception):
    """Why a file gave no text: ``code`` for programs, ``message`` for the person who uploaded it."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


_EXTENSIONS = {
    ".pdf": "pdf",
    ".docx": "docx",
    ".txt": "txt",
    ".text": "txt",
    ".md": "md",
    ".markdown": "md",
    ".csv": "csv",
    ".html": "html",
    ".htm": "html",
}
_CONTENT_TYPES = {
    "application/pdf": "pdf",
    "application/vnd.openxmlformats-officedocument.wordprocessingml.document": "docx",
    "text/plain": "txt",
    "text/markdown": "md",
    "text/x-markdown": "md",
    "text/csv": "csv",
    "text/html": "html",
    "application/xhtml+xml": "html",
}
# Formats people upload by mistake, named so the message can say what to do instead.
_OTHER_MAGIC = (
    (b"\xd0\xcf\x11\xe0", "an old Microsoft Office file (.doc/.xls); save it as .docx or PDF"),
    (b"\x89PNG", "a PNG image; upload a document with text"),
    (b"\xff\xd8\xff", "a JPEG image; upload a document with text"),
    (b"GIF8", "a GIF image; upload a document with text"),
    (b"\x1f\x8b", "a gzip archive"),
    (b"{\\rtf", "an RTF document; save it as .docx or PDF"),
)


def detect_type(head: bytes, filename: str, content_type: str | None = None) -> str:
    """One of TYPES: magic bytes first, the name's extension second, the content type last."""
    ext = _EXTENSIONS.get(Path(filename).suffix.lower())
    declared = _CONTENT_TYPES.get((content_type or "").split(";")[0].strip().lower())
    if head.lstrip(b"\r\n\t \x00")[:5] == b"%PDF-" or b"%PDF-" in head[:1024]:
        return "pdf"
    if head[:4] == b"PK\x03\x04":
        if ext == "docx" or declared == "docx" or _zip_has(head, b"word/document.xml"):
            return "docx"
        raise ExtractionError("unsupported_type", f"{filename!r} is a zip archive, not a Word (.docx) document.")
    for magic, what in _OTHER_MAGIC:
        if head.startswith(magic):
            raise ExtractionError("unsupported_type", f"{filename!r} is {what}.")
    if ext == "pdf" or (ext is None and declared == "pdf"):
        raise ExtractionError("corrupt_pdf", f"{filename!r} is not a valid PDF: it does not start with a PDF header.")
    if ext == "docx" or (ext is None and declared == "docx"):
        raise ExtractionError("corrupt_docx", f"{filename!r} is not a valid Word document: it is not a zip package.")
    if b"\x00" in head and not head.startswith((b"\xff\xfe", b"\xfe\xff")):
        raise ExtractionError(
            "unsupported_type", f"{filename!r} is a binary file; supported are PDF, DOCX, TXT, MD, CSV and HTML."
        )
    if ext is not None:
        return ext
    if declared is not None:
        return declared
    if re.match(rb"\s*(<!doctype html|<html)", head[:512], re.IGNORECASE):
        return "html"
    return "txt"


def _zip_has(head: bytes, name: bytes) -> bool:
    return name in head[:4096]


def extract(
    path: Path,
    filename: str,
    content_type: str | None = None,
    *,
    max_pages: int = MAX_PAGES,
    max_chars: int = MAX_CHARS,
) -> Document:
    path = Path(path)
    with path.open("rb") as fh:
        head = fh.read(4096)
    if not head.strip():
        if not head or path.stat().st_size <= len(head):
            raise ExtractionError("empty_file", f"{filename!r} is empty.")
    kind = detect_type(head, filename, content_type)
    if kind == "pdf":
        doc = _pdf(path, filename, max_pages, max_chars)
    elif kind == "docx":
        doc = _docx(path, filename, max_chars)
    else:
        text = _read_text(path, filename, max_chars)
        doc = {"txt": _txt, "md": _markdown, "csv": _csv, "html": _html}[kind](text, filename)
    doc = [s for s in doc if s.text.strip()]
    if not doc:
        raise ExtractionError("empty_file", f"{filename!r} contains no text.")
    if sum(len(s.text) for s in doc) > max_chars:
        raise _too_large(filename, max_chars)
    return doc


def _too_large(filename: str, max_chars: int) -> ExtractionError:
    return ExtractionError("too_large", f"{filename!r} has more than {max_chars:,} characters of text; split it.")


# -- plain text formats -------------------------------------------------------------------


def _read_text(path: Path, filename: str, max_chars: int) -> str:
    with path.open("rb") as fh:
        raw = fh.read(max_chars * 4 + 1)
    if len(raw) > max_chars * 4:
        raise _too_large(filename, max_chars)
    if raw.startswith((b"\xff\xfe", b"\xfe\xff")):
        text = raw.decode("utf-16", errors="replace")
    else:
        try:
            text = raw.decode("utf-8-sig")
        except UnicodeDecodeError:
            text = raw.decode("cp1252", errors="replace")
    if len(text) > max_chars:
        raise _too_large(filename, max_chars)
    if not text.strip():
        raise ExtractionError("empty_file", f"{filename!r} contains no text.")
    return text.replace("\r\n", "\n").replace("\r", "\n")


def _txt(text: str, filename: str) -> Document:
    return [Section((), text.strip())]


# (#{1,6}) then the title; its closing #s and spaces are cut in Python: one pattern that also
# matched them (``\s+(.+?)\s*#*\s*$``) backtracked cubically over a long run of spaces
_HEADING = re.compile(r"(#{1,6})\s+(.+)")
_FENCE = re.compile(r"^\s*(```|~~~)")


def _markdown(text: str, filename: str) -> Document:
    sections: Document = []
    path: tuple[str, ...] = ()
    body: list[str] = []
    fenced = False

    def flush() -> None:
        if "".join(body).strip():
            sections.append(Section(path, "\n".join(body).strip()))
        body.clear()

    for line in text.split("\n"):
        if _FENCE.match(line):
            fenced = not fenced
        match = None if fenced else _HEADING.fullmatch(line)
        if match:
            flush()
            level = len(match.group(1))
            path = (*path[: level - 1], _heading_title(match.group(2)))
        else:
            body.append(line)
    flush()
    return sections


def _heading_title(text: str) -> str:
    """A heading's text without its closing spaces and #s (its first character stays)."""
    end = max(1, len(text.rstrip().rstrip("#").rstrip()))
    return text[:end].strip()


def _csv(text: str, filename: str) -> Document:
    sample = text[:8192]
    try:
        dialect: type[csv.Dialect] | csv.Dialect = csv.Sniffer().sniff(sample, delimiters=",;\t|")
    except csv.Error:
        dialect = csv.excel
    # Row by row, at most MAX_ROWS: a list of every row and then a section each cost ~250 bytes
    # a row, so 5 MB of one-letter rows held ~630 MB of the gateway process before the
    # character bound refused it.
    header: list[str] | None = None
    sections: Document = []
    try:
        for row in csv.reader(io.StringIO(text), dialect):
            if not any(c.strip() for c in row):
                continue
            if header is None:
                header = [h.strip() or f"column {i + 1}" for i, h in enumerate(row)]
                continue
            if len(sections) >= MAX_ROWS:
                raise ExtractionError("too_large", f"{filename!r} has more than {MAX_ROWS:,} rows; split it.")
            names = header + [f"column {i + 1}" for i in range(len(header), len(row))]
            cells = [f"{name}: {value.strip()}" for name, value in zip(names, row, strict=False) if value.strip()]
            sections.append(Section((), "; ".join(cells), "row"))
    except csv.Error as exc:
        raise ExtractionError("unsupported_type", f"{filename!r} is not a readable CSV file ({exc}).") from None
    if not sections:
        raise ExtractionError("empty_file", f"{filename!r} has a header but no rows.")
    return sections


# -- HTML ---------------------------------------------------------------------------------

_SKIP = {"script", "style", "nav", "noscript", "template", "svg", "head"}
_BLOCKS = {
    "p", "div", "section", "article", "main", "header", "footer", "aside", "ul", "ol", "li",
    "table", "tr", "blockquote", "pre", "br", "hr", "dl", "dt", "dd", "figure", "figcaption",
    "form", "fieldset", "address",
}  # fmt: skip
_VOID = {"br", "hr", "img", "input", "meta", "link", "area", "base", "col", "embed", "source", "track", "wbr"}


class _HtmlSections(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.sections: Document = []
        self.path: tuple[str, ...] = ()
        self.lines: list[str] = []
        self.line: list[str] = []
        self.skip: list[str] = []
        self.heading: tuple[int, list[str]] | None = None
        self.cell = False

    def handle_starttag(self, tag: str, attrs: list) -> None:
        if self.skip:
            if tag not in _VOID:
                self.skip.append(tag)
            return
        if tag in _SKIP:
            self.skip.append(tag)
        elif len(tag) == 2 and tag[0] == "h" and tag[1] in "123456":
            self._end_line()
            self._flush()
            self.heading = (int(tag[1]), [])
        elif tag in ("td", "th"):
            if self.cell:
                self.line.append(" | ")
            self.cell = True
        elif tag in _BLOCKS:
            self._end_line()
            if tag == "tr":
                self.cell = False

    def handle_endtag(self, tag: str) -> None:
        if self.skip:
            if self.skip[-1] == tag:
                self.skip.pop()
            return
        if self.heading is not None and len(tag) == 2 and tag[0] == "h" and tag[1] in "123456":
            level, words = self.heading
            title = " ".join("".join(words).split())
            if title:
                self.path = (*self.path[: level - 1], title)
            self.heading = None
        elif tag in _BLOCKS:
            self._end_line()

    def handle_data(self, data: str) -> None:
        if self.skip:
            return
        if self.heading is not None:
            self.heading[1].append(data)
        else:
            self.line.append(data)

    def _end_line(self) -> None:
        line = " ".join("".join(self.line).split())
        self.line = []
        self.cell = False
        if line:
            self.lines.append(line)

    def _flush(self) -> None:
        if self.lines:
            self.sections.append(Section(self.path, "\n\n".join(self.lines)))
        self.lines = []

    def result(self) -> Document:
        self._end_line()
        self._flush()
        return self.sections


def _html(text: str, filename: str) -> Document:
    parser = _HtmlSections()
    try:
        parser.feed(text)
        parser.close()
    except AssertionError:  # html.parser's answer to some malformed markup ("<![" ...)
        raise ExtractionError("corrupt_html", f"{filename!r} is not HTML that can be read.") from None
    return parser.result()


# -- PDF ----------------------------------------------------------------------------------


def _pdf(path: Path, filename: str, max_pages: int, max_chars: int) -> Document:
    from pypdf import PdfReader
    from pypdf.errors import FileNotDecryptedError, PdfReadError

    try:
        reader = PdfReader(path)
        if reader.is_encrypted and not reader.decrypt(""):
            raise ExtractionError(
                "encrypted_pdf", f"{filename!r} is password-protected; remove the password and upload it again."
            )
        pages = reader.pages
        count = len(pages)
    except ExtractionError:
        raise
    except (FileNotDecryptedError, NotImplementedError) as exc:
        raise ExtractionError(
            "encrypted_pdf", f"{filename!r} is encrypted in a way that cannot be opened here ({exc})."
        ) from None
    except Exception:
        raise ExtractionError("corrupt_pdf", f"{filename!r} is damaged and cannot be read as a PDF.") from None
    if count == 0:
        raise ExtractionError("corrupt_pdf", f"{filename!r} is damaged: no readable pages.")
    if count > max_pages:
        raise ExtractionError("too_large", f"{filename!r} has {count:,} pages; the limit is {max_pages:,}.")
    headings = _pdf_outline(reader)
    sections: Document = []
    total = 0
    path: tuple[str, ...] = ()
    for number in range(count):
        for level, title in headings.get(number, ()):
            path = (*path[:level], title)
        try:
            text = pages[number].extract_text() or ""
        except (PdfReadError, Exception):
            raise ExtractionError(
                "corrupt_pdf", f"{filename!r} is damaged: page {number + 1} cannot be read."
            ) from None
        text = _tidy(text)
        total += len(text)
        if total > max_chars:
            raise _too_large(filename, max_chars)
        if text:
            sections.append(Section(path, text))
    if not sections:
        raise ExtractionError(
            "no_text_layer",
            f"{filename!r} has no text layer (it looks like a scanned image); run OCR on it or upload the source file.",
        )
    return sections


def _pdf_outline(reader) -> dict[int, list[tuple[int, str]]]:
    """Bookmarks as headings: page index → [(depth, title)], best effort."""
    found: dict[int, list[tuple[int, str]]] = {}

    def walk(items, depth: int) -> None:
        for item in items:
            if isinstance(item, list):
                walk(item, depth + 1)
                continue
            try:
                page = reader.get_destination_page_number(item)
                title = " ".join(str(item.title).split())
            except Exception:
                continue
            if page is not None and page >= 0 and title:
                found.setdefault(page, []).append((depth, title))

    try:
        walk(reader.outline, 0)
    except Exception:
        return {}
    return found


def _tidy(text: str) -> str:
    lines = [" ".join(line.split()) for line in text.replace("\r", "\n").split("\n")]
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip()


# -- DOCX ---------------------------------------------------------------------------------


def _docx(path: Path, filename: str, max_chars: int) -> Document:
    corrupt = ExtractionError("corrupt_docx", f"{filename!r} is a damaged Word document and cannot be opened.")
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
            if "word/document.xml" not in names:
                raise corrupt
            if sum(info.file_size for info in archive.infolist()) > MAX_UNZIPPED:
                raise _too_large(filename, max_chars)
    except ExtractionError:
        raise
    except Exception:
        raise corrupt from None
    try:
        import docx
        from docx.table import Table
        from docx.text.paragraph import Paragraph

        document = docx.Document(str(path))
        body = document.element.body
        sections: Document = []
        path_: tuple[str, ...] = ()
        lines: list[str] = []
        total = 0

        def flush() -> None:
            if lines:
                sections.append(Section(path_, "\n\n".join(lines)))
                lines.clear()

        for child in body.iterchildren():
            tag = child.tag.rsplit("}", 1)[-1]
            if tag == "p":
                para = Paragraph(child, document)
                text = " ".join(para.text.split())
                if not text:
                    continue
                total += len(text)
                level = _heading_level(para)
                if level:
                    flush()
                    path_ = (*path_[: level - 1], text)
                else:
                    lines.append(text)
            elif tag == "tbl":
                flush()
                text = _table_text(Table(child, document))
                total += len(text)
                if text:
                    sections.append(Section(path_, text, "table"))
            if total > max_chars:
                raise _too_large(filename, max_chars)
        flush()
        return sections
    except ExtractionError:
        raise
    except Exception:
        raise corrupt from None


def _heading_level(para) -> int:
    name = (para.style.name if para.style is not None else "") or ""
    if name == "Title":
        return 1
    match = re.fullmatch(r"Heading (\d)", name)
    return int(match.group(1)) if match else 0


def _table_text(table) -> str:
    rows = []
    for row in table.rows:
        cells: list[str] = []
        previous = None
        for cell in row.cells:  # a merged cell repeats: keep it once
            if cell._tc is previous:
                continue
            previous = cell._tc
            cells.append(" ".join(cell.text.split()))
        rows.append(cells)
    rows = [r for r in rows if any(r)]
    if not rows:
        return ""
    if len(rows) == 1:
        return " | ".join(c for c in rows[0] if c)
    header = [h or f"column {i + 1}" for i, h in enumerate(rows[0])]
    out = []
    for row in rows[1:]:
        names = header + [f"column {i + 1}" for i in range(len(header), len(row))]
        out.append("; ".join(f"{n}: {v}" for n, v in zip(names, row, strict=False) if v))
    return "\n".join(line for line in out if line)
