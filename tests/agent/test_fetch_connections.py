"""A response the agent does not read to the end never poisons its pooled connection.

A real HTTP/1.1 server (keep-alive, Content-Length) answers 404 with a body, then 200; the
agent's fetchers run over one pooled connection, as against the fleet's ``/repo``. Before
the fix the unread 404 body was read as the next response's status line
(``BadStatusLine('{"detail":"not found"}HTTP/1.1 200 OK')``), failing the next metadata
fetch: what devices saw under load as ``untrusted_metadata``.
"""

from __future__ import annotations

import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import urllib3
from tuf.api import exceptions as tuf_errors

from agent.trust.client import _BoundedFetcher
from agent.trust.download import DownloadLimits

BODY = b'{"version": 1}'


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive: the client pools the connection

    def do_GET(self) -> None:
        missing = self.path.endswith("2.root.json")
        body = b'{"detail":"not found"}' if missing else BODY
        self.send_response(404 if missing else 200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *_args) -> None:
        pass


@pytest.fixture
def server():
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


def test_a_not_found_answer_leaves_no_bytes_for_the_next_request(server):
    http = urllib3.PoolManager(maxsize=1, retries=False)
    fetcher = _BoundedFetcher(http, DownloadLimits())
    for _ in range(3):
        with pytest.raises(tuf_errors.DownloadHTTPError):
            b"".join(fetcher.fetch(f"{server}/metadata/2.root.json"))
        assert b"".join(fetcher.fetch(f"{server}/metadata/timestamp.json")) == BODY
