"""Builds the retrieval-quality corpus next to this file from real-world legal text: the
software licences Debian ships in /usr/share/common-licenses (each says it may be copied and
distributed verbatim). Many passages look alike across them (GPL-2 / GPL-3 / LGPL warranty,
termination and patent clauses; Apache and MPL patent grants), which is what makes retrieval
hard. The text is kept word for word; only the container changes, so the corpus covers several
formats: plain text, Markdown (numbered clauses become headings), HTML and DOCX.

    .venv/bin/python tests/data/kb/recall/make_corpus.py
"""

from __future__ import annotations

import html
import re
from pathlib import Path

HERE = Path(__file__).resolve().parent
SOURCE = Path("/usr/share/common-licenses")
_CLAUSE = re.compile(r"^\s{0,4}(\d{1,2})\.\s+(.{3,90})$")


def paragraphs(text: str) -> list[str]:
    return [" ".join(p.split()) for p in re.split(r"\n\s*\n", text) if p.strip()]


def clauses(text: str) -> list[tuple[str | None, list[str]]]:
    """(heading or None, paragraphs) in order: a paragraph opening with "N. " starts a clause."""
    out: list[tuple[str | None, list[str]]] = [(None, [])]
    for para in paragraphs(text):
        m = re.match(r"^(\d{1,2})\.\s+(.*)$", para)
        if m:
            title = m.group(2)
            first, _, rest = title.partition(". ")
            heading = f"{m.group(1)}. {first}" if len(first) <= 80 else f"Section {m.group(1)}"
            out.append((heading, [rest] if rest and len(first) <= 80 else [title]))
        else:
            out[-1][1].append(para)
    return [c for c in out if c[1]]


def to_markdown(title: str, text: str) -> str:
    lines = [f"# {title}", ""]
    for heading, paras in clauses(text):
        if heading:
            lines += [f"## {heading}", ""]
        for p in paras:
            lines += [p, ""]
    return "\n".join(lines)


def to_html(title: str, text: str) -> str:
    body = [f"<h1>{html.escape(title)}</h1>"]
    for heading, paras in clauses(text):
        if heading:
            body.append(f"<h2>{html.escape(heading)}</h2>")
        body += [f"<p>{html.escape(p)}</p>" for p in paras]
    return (
        "<!DOCTYPE html>\n<html><head><meta charset='utf-8'><title>"
        + html.escape(title)
        + "</title></head><body>\n"
        + "\n".join(body)
        + "\n</body></html>\n"
    )


def to_docx(title: str, text: str, path: Path) -> None:
    import docx

    document = docx.Document()
    document.add_heading(title, level=1)
    for heading, paras in clauses(text):
        if heading:
            document.add_heading(heading, level=2)
        for p in paras:
            document.add_paragraph(p)
    document.core_properties.created = __import__("datetime").datetime(2020, 1, 1)
    document.save(str(path))


def main() -> None:
    read = {
        name: (SOURCE / name).read_text()
        for name in ("Apache-2.0", "GPL-2", "GPL-3", "LGPL-2.1", "MPL-2.0", "CC0-1.0", "Artistic", "GFDL-1.3", "BSD")
    }
    (HERE / "apache-2.0.txt").write_text(read["Apache-2.0"])
    (HERE / "gpl-2.txt").write_text(read["GPL-2"])
    (HERE / "gpl-3.md").write_text(to_markdown("GNU General Public License, version 3", read["GPL-3"]))
    (HERE / "lgpl-2.1.html").write_text(to_html("GNU Lesser General Public License, version 2.1", read["LGPL-2.1"]))
    to_docx("Mozilla Public License, version 2.0", read["MPL-2.0"], HERE / "mpl-2.0.docx")
    (HERE / "cc0-1.0.txt").write_text(read["CC0-1.0"])
    (HERE / "artistic.md").write_text(to_markdown("The Artistic License", read["Artistic"]))
    (HERE / "gfdl-1.3.html").write_text(to_html("GNU Free Documentation License, version 1.3", read["GFDL-1.3"]))
    (HERE / "bsd.txt").write_text(read["BSD"])


if __name__ == "__main__":
    main()
