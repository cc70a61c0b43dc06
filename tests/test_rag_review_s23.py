"""The knowledge bases and the OpenAI files / vector stores API after an attacker's review
(session 23): each test is named for what a client tried, on a real gateway over HTTP with the
OpenAI SDK or httpx as client."""

from __future__ import annotations

import os
import uuid

import httpx
import openai
import pytest

from tests.conftest import wait_until
from tests.test_kb_api import start_gateway
from tests.test_policies import new_key

EXTRACT_TIMEOUT = "4"  # seconds a sandboxed extraction may take in these tests


@pytest.fixture(scope="module")
def gw(tmp_root, services, module_mock):
    saved = os.environ.get("GATEWAY_KB_EXTRACT_TIMEOUT")
    os.environ["GATEWAY_KB_EXTRACT_TIMEOUT"] = EXTRACT_TIMEOUT
    try:
        g = start_gateway(tmp_root, module_mock, services)
    finally:
        if saved is None:
            os.environ.pop("GATEWAY_KB_EXTRACT_TIMEOUT", None)
        else:
            os.environ["GATEWAY_KB_EXTRACT_TIMEOUT"] = saved
    yield g
    g.stop()


def sdk(gw, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{gw.url}/v1", api_key=key, max_retries=0, timeout=20)


@pytest.fixture(scope="module")
def tenant_key(gw) -> dict:
    return new_key(gw, tenant=f"rag23-{uuid.uuid4().hex[:6]}")


@pytest.fixture(scope="module")
def client(gw, tenant_key):
    with sdk(gw, tenant_key["key"]) as c:
        yield c


def attach(client: openai.OpenAI, vs_id: str, name: str, data: bytes):
    f = client.files.create(file=(name, data), purpose="assistants")
    return f, client.vector_stores.files.create(vector_store_id=vs_id, file_id=f.id)


def settled(client: openai.OpenAI, vs_id: str, file_id: str, timeout: float = 60.0):
    """The vector-store file once it left in_progress (each poll a short HTTP call: a replica
    whose event loop is held answers none of them)."""
    found = {}

    def done() -> bool:
        try:
            found["f"] = client.vector_stores.files.retrieve(file_id=file_id, vector_store_id=vs_id)
        except (openai.APITimeoutError, openai.APIConnectionError):
            return False
        return found["f"].status != "in_progress"

    wait_until(done, timeout=timeout, what=f"vector-store file {file_id} processed")
    return found["f"]


def test_markdown_heading_with_a_long_run_of_spaces_is_read_in_linear_time(gw, client):
    """ReDoS: the Markdown heading pattern ``^(#{1,6})\\s+(.+?)\\s*#*\\s*$`` backtracks
    cubically over a heading line with a long run of spaces before its last word ("# a",
    3,000 spaces, "b": ~20 s; 8 KB: minutes). It ran in a thread of the gateway process and
    CPython's re holds the GIL for a whole match, so a few KB uploaded by any key froze the
    replica's event loop (every client's calls) for as long as the file had such lines, and
    the next replica to claim the job after the visibility timeout froze in turn."""
    vs = client.vector_stores.create(name="redos")
    evil = "".join(f"# a{' ' * 3000}b\n\nParagraph {i} about widgets.\n\n" for i in range(6))
    body = "# Widgets\n\nWidgets are blue.\n\n" + evil
    f, _ = attach(client, vs.id, "notes.md", body.encode())
    done = settled(client, vs.id, f.id)
    assert done.status == "completed", done
    hits = client.vector_stores.search(vs.id, query="Widgets are blue", max_num_results=3)
    assert any("Widgets are blue" in h.content[0].text for h in hits)


def test_html_that_makes_the_parser_quadratic_is_cut_off_at_the_extraction_deadline(gw, client):
    """DoS: CPython 3.11's html.parser rescans the rest of the input for every unterminated
    start tag, so ``<a `` repeated (60 KB: ~30 s; a 20 MB upload: days) kept a gateway thread
    and a CPU busy without end — HTML was read in-process, outside the sandbox's deadline and
    CPU limit. It is now read in the sandboxed child like PDF and DOCX: the file fails with
    ``invalid_file`` at the deadline, and a good HTML file next to it is still read."""
    vs = client.vector_stores.create(name="html-bomb")
    bomb, _ = attach(client, vs.id, "page.html", b"<p>hello</p>" + b"<a " * 400_000)
    good, _ = attach(client, vs.id, "help.html", b"<html><body><h1>Help</h1><p>Call us at noon.</p></body></html>")
    odd, _ = attach(client, vs.id, "odd.html", b"<p>hello</p><![<![")  # html.parser raised AssertionError
    assert settled(client, vs.id, good.id).status == "completed"
    failed = settled(client, vs.id, bomb.id)
    assert failed.status == "failed" and failed.last_error.code == "invalid_file", failed
    failed = settled(client, vs.id, odd.id)  # its file's fault, not a server_error after every retry
    assert failed.status == "failed" and failed.last_error.code == "invalid_file", failed
    # the replica answers meanwhile and afterwards
    assert httpx.get(f"{gw.url}/readyz", timeout=5).status_code == 200
