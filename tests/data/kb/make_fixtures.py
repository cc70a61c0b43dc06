"""Writes the knowledge-base fixtures next to this file: one real file of every supported type
plus the failures a person will upload (a scanned PDF, an encrypted PDF, a corrupt DOCX, an
empty file). Run it again after changing it and commit its outputs:

    .venv/bin/python tests/data/kb/make_fixtures.py
"""

from __future__ import annotations

import io
import zlib
from pathlib import Path

HERE = Path(__file__).resolve().parent


def _pdf(objects: list[bytes]) -> bytes:
    """A PDF file from its numbered objects (1..n, 1 is the catalog), with a correct xref."""
    out = bytearray(b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n")
    offsets = []
    for number, body in enumerate(objects, start=1):
        offsets.append(len(out))
        out += b"%d 0 obj\n" % number + body + b"\nendobj\n"
    xref = len(out)
    out += b"xref\n0 %d\n0000000000 65535 f \n" % (len(objects) + 1)
    for offset in offsets:
        out += b"%010d 00000 n \n" % offset
    out += b"trailer\n<< /Size %d /Root 1 0 R >>\nstartxref\n%d\n%%%%EOF\n" % (len(objects) + 1, xref)
    return bytes(out)


def _stream(data: bytes, extra: bytes = b"") -> bytes:
    return b"<< /Length %d %s>>\nstream\n" % (len(data), extra) + data + b"\nendstream"


def _text_page(lines: list[str]) -> bytes:
    ops = [b"BT", b"/F1 12 Tf", b"72 720 Td", b"16 TL"]
    for line in lines:
        escaped = line.replace("\\", "\\\\").replace("(", "\\(").replace(")", "\\)")
        ops.append(b"(" + escaped.encode("latin-1") + b") Tj T*")
    ops.append(b"ET")
    return b"\n".join(ops)


PAGE_ONE = [
    "Acme Cloud Handbook",
    "Acme Cloud stores customer files in three regions.",
    "Backups run every night at two in the morning.",
]
PAGE_TWO = [
    "The Enterprise plan costs 99 dollars per seat per month.",
    "Enterprise customers get a dedicated support engineer.",
]


def text_pdf() -> bytes:
    pages = [_text_page(PAGE_ONE), _text_page(PAGE_TWO)]
    objects = [
        b"<< /Type /Catalog /Pages 2 0 R >>",
        b"<< /Type /Pages /Kids [4 0 R 6 0 R] /Count 2 >>",
        b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>",
    ]
    for i, content in enumerate(pages):
        page_obj = 4 + 2 * i
        objects.append(
            b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Resources << /Font << /F1 3 0 R >> >> "
            b"/Contents %d 0 R >>" % (page_obj + 1)
        )
        objects.append(_stream(content))
    return _pdf(objects)


def with_outline(raw: bytes) -> bytes:
    from pypdf import PdfReader, PdfWriter

    writer = PdfWriter(clone_from=PdfReader(io.BytesIO(raw)))
    writer.add_outline_item(title="Overview", page_number=0)
    writer.add_outline_item(title="Pricing", page_number=1)
    out = io.BytesIO()
    writer.write(out)
    return out.getvalue()


def scanned_pdf() -> bytes:
    width = height = 16
    pixels = bytes((x * 16 + y * 7) % 256 for y in range(height) for x in range(width))
    image = _stream(
        zlib.compress(pixels),
        b"/Type /XObject /Subtype /Image /Width %d /Height %d /ColorSpace /DeviceGray "
        b"/BitsPerComponent 8 /Filter /FlateDecode " % (width, height),
    )
    objects = [
        b"<< /Type /Catalog /Pages 2 0 R >>",
        b"<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
        b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Resources << /XObject << /Im1 5 0 R >> >> "
        b"/Contents 4 0 R >>",
        _stream(b"q 400 0 0 400 100 300 cm /Im1 Do Q"),
        image,
    ]
    return _pdf(objects)


def encrypted_pdf(raw: bytes) -> bytes:
    from pypdf import PdfReader, PdfWriter

    writer = PdfWriter(clone_from=PdfReader(io.BytesIO(raw)))
    writer.encrypt(user_password="open-sesame", owner_password="owner-secret", algorithm="AES-128")
    out = io.BytesIO()
    writer.write(out)
    return out.getvalue()


def docx_file() -> bytes:
    import docx

    document = docx.Document()
    document.add_heading("Product guide", 0)
    document.add_paragraph("This guide explains what Acme Cloud offers and what it costs.")
    document.add_heading("Pricing", 1)
    document.add_paragraph("Prices are per seat and billed monthly.")
    document.add_heading("Enterprise", 2)
    document.add_paragraph("The Enterprise plan includes single sign-on and audit logs.")
    table = document.add_table(rows=3, cols=3)
    values = [("Plan", "Price", "Seats"), ("Team", "$20", "10"), ("Enterprise", "$99", "500")]
    for row, cells in zip(table.rows, values, strict=True):
        for cell, value in zip(row.cells, cells, strict=True):
            cell.text = value
    document.add_heading("Support", 1)
    document.add_paragraph("Support answers within one business day.")
    document.core_properties.author = "fixtures"
    out = io.BytesIO()
    document.save(out)
    return out.getvalue()


TXT = """Returns policy

Customers may return any product within 30 days of delivery. Items must be unused and in the original packaging.

Refunds are paid to the original payment method within five business days after the return arrives.
"""

MD = """# Acme Cloud

Acme Cloud is a file storage service for small teams.

## Pricing

The Team plan costs 20 dollars per seat.

### Enterprise

The Enterprise plan costs 99 dollars per seat and includes single sign-on.

```
# not a heading: inside a code block
```

## Security

Files are encrypted at rest with AES-256.
"""

CSV = """Product,Price,Stock
Widget,4.99,120
Gadget,12.50,8
"Deluxe Gizmo, large",99.00,2
"""

HTML = """<!doctype html>
<html><head><title>Acme help</title><style>body { color: red }</style></head>
<body>
<nav><a href="/">Home</a> <a href="/help">Help</a></nav>
<h1>Help centre</h1>
<p>Welcome to the Acme help centre.</p>
<script>var tracking = "do not index";</script>
<h2>Shipping</h2>
<p>Orders ship within <b>two</b> days.</p>
<ul><li>Standard: 5 days</li><li>Express: 1 day</li></ul>
<h2>Returns</h2>
<p>Returns are free for 30 days.</p>
</body></html>
"""


def main() -> None:
    plain = text_pdf()
    files = {
        "text.pdf": with_outline(plain),
        "scanned.pdf": scanned_pdf(),
        "encrypted.pdf": encrypted_pdf(plain),
        "corrupt.pdf": plain[:300],
        "guide.docx": docx_file(),
        "returns.txt": TXT.encode(),
        "acme.md": MD.encode(),
        "products.csv": CSV.encode(),
        "help.html": HTML.encode(),
        "empty.txt": b"",
    }
    files["corrupt.docx"] = files["guide.docx"][: len(files["guide.docx"]) // 2]
    for name, data in files.items():
        (HERE / name).write_bytes(data)
        print(f"{name}: {len(data)} bytes")


if __name__ == "__main__":
    main()
