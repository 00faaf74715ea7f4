"""The browser tool: local corpus search/open/find, citations, SSRF policy, SearXNG backend."""

from __future__ import annotations

import asyncio
import json
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from ossrt.tools import BrowserTool, LocalCorpus, SearxngBackend, ToolInvocation
from ossrt.tools.browser import BrowserConfig, FetchConfig, FetchError, SafeFetcher
from ossrt.tools.browser.fetch import address_allowed


# -- a tiny local HTTP server -------------------------------------------------------------
class _Server:
    def __init__(self, routes: dict[str, tuple[int, dict[str, str], bytes]]) -> None:
        self.routes = routes
        self.hits: list[str] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802
                server.hits.append(self.path)
                status, headers, body = server.routes.get(
                    self.path.split("?")[0], (404, {"Content-Type": "text/plain"}, b"nope"))
                if callable(body):
                    body = body(self.path)
                self.send_response(status)
                for k, v in headers.items():
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *a: object) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"


@contextmanager
def serve(routes: dict) -> Iterator[_Server]:
    s = _Server(routes)
    s.thread.start()
    try:
        yield s
    finally:
        s.httpd.shutdown()
        s.httpd.server_close()


def call(tool: BrowserTool, fn: str, args: dict | str, conv: str | None = "c1"):
    raw = args if isinstance(args, str) else json.dumps(args)
    return asyncio.run(tool.run(ToolInvocation(f"browser.{fn}", raw, conv)))


# -- local corpus -------------------------------------------------------------------------
DOCS = {
    "gardening.md": "# Gardening tips\n\nWater tomatoes in the morning. Mulch keeps soil moist.\n",
    "cooking/pasta.md": "# Cooking pasta\n\nBoil salted water, add pasta, stir.\n",
    "history.txt": "A short history of Rome\n\nRome was founded, grew, and fell.\n",
    "cars.html": "<html><head><title>Electric cars</title></head><body><p>Batteries store "
                 "energy.</p><script>evil()</script></body></html>",
    "music.md": "# Music\n\nScales and chords. Tomatoes are not instruments.\n",
    "zeppelin.md": "# The Hindenburg airship\n\n"
                   + "".join(f"Paragraph {i}: filler about airships and travel.\n" for i in range(40))
                   + "The Hindenburg airship burned at Lakehurst in 1937, ending the zeppelin "
                     "era of passenger travel.\n"
                   + "".join(f"More filler line {i}.\n" for i in range(20))
                   + "See [pasta](cooking/pasta.md) and [the wiki](https://en.wikipedia.org/"
                     "wiki/Hindenburg_disaster).\n",
}


@pytest.fixture()
def corpus(tmp_path: Path) -> Path:
    root = tmp_path / "corpus"
    for rel, text in DOCS.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    (tmp_path / "secret.txt").write_text("TOPSECRET outside the corpus")
    return root


def test_search_ranks_relevant_first_and_open_by_id(corpus: Path):
    tool = BrowserTool(LocalCorpus(corpus, rescan_interval_s=0))
    out = call(tool, "search", {"query": "Hindenburg airship Lakehurst 1937", "topn": 5})
    assert out.ok, out.text
    lines = out.text.splitlines()
    assert lines[0] == "[0] Search results for `Hindenburg airship Lakehurst 1937`"
    assert lines[1].startswith("**viewing lines [0 - ")
    assert lines[3] == "L0: # 【0†The Hindenburg airship†corpus】"
    assert out.citations[0].url == "corpus://zeppelin.md"
    assert out.citations[0].kind == "search_result" and out.citations[0].cursor == 0

    page = call(tool, "open", {"id": 0, "num_lines": 5})
    assert page.ok and page.meta["cursor"] == 1
    assert page.text.splitlines()[:4] == [
        "[1] The Hindenburg airship (corpus://zeppelin.md)",
        f"**viewing lines [0 - 4] of {page.meta['lines'] - 1}**", "",
        "L0: # The Hindenburg airship"]
    assert page.text.splitlines()[-1] == "L4: Paragraph 2: filler about airships and travel."
    assert page.citations[0].url == "corpus://zeppelin.md"

    # scrolling: loc/num_lines on the same cursor
    more = call(tool, "open", {"cursor": 1, "loc": 42, "num_lines": 3})
    body = more.text.splitlines()
    assert body[0].startswith("[2] The Hindenburg airship")
    assert body[1] == f"**viewing lines [42 - 44] of {page.meta['lines'] - 1}**"
    assert body[3].startswith("L42: The Hindenburg airship burned at Lakehurst in 1937")

    # find returns the matching lines, and a result link opens the page at that line
    found = call(tool, "find", {"pattern": "lakehurst", "cursor": 1})
    assert found.ok and found.meta["matches"] == 1
    assert "# 【0†match at L42】" in found.text and "L1: The Hindenburg airship burned" in found.text
    jump = call(tool, "open", {"id": 0, "num_lines": 1})
    assert "L42: The Hindenburg airship burned" in jump.text
    assert "No `find` results" in call(tool, "find", {"pattern": "no-such-thing"}).text

    # links in a page are numbered and followable (relative corpus links resolve)
    tail = call(tool, "open", {"cursor": 1, "loc": page.meta["lines"] - 2})
    assert "【0†pasta†corpus】" in tail.text and "【1†the wiki†en.wikipedia.org】" in tail.text
    pasta = call(tool, "open", {"id": 0})
    assert pasta.text.startswith("[7] Cooking pasta (corpus://cooking/pasta.md)")


def test_citations_map_to_urls(corpus: Path):
    tool = BrowserTool(LocalCorpus(corpus))
    call(tool, "search", {"query": "water tomatoes mulch"})
    call(tool, "open", {"id": "corpus://zeppelin.md"})
    text = "It burned in 1937 【1†L42-L43】 and tomatoes 【0†L0】; bogus 【9†L1】."
    same, cites = tool.annotate(text, "c1")
    assert same == text and len(cites) == 2
    first, second = cites
    assert (first.url, first.title) == ("corpus://zeppelin.md", "The Hindenburg airship")
    assert text[first.start_index:first.end_index] == "【1†L42-L43】"
    assert second.url == "corpus://gardening.md"  # the search result whose lines L0 cites
    assert text[second.start_index:second.end_index] == "【0†L0】"
    assert tool.annotator("c1")(text)[0] == {
        "type": "url_citation", "start_index": first.start_index, "end_index": first.end_index,
        "url": "corpus://zeppelin.md", "title": "The Hindenburg airship"}
    new, cites = tool.annotate(text, "c1", style="domain")
    assert new == "It burned in 1937 (corpus) and tomatoes (corpus); bogus 【9†L1】."
    assert [new[c.start_index:c.end_index] for c in cites] == ["(corpus)", "(corpus)"]


def test_html_text_and_reindex(corpus: Path):
    tool = BrowserTool(LocalCorpus(corpus, rescan_interval_s=0))
    cars = call(tool, "open", {"id": "corpus://cars.html"})
    assert cars.text.startswith("[0] Electric cars (corpus://cars.html)")
    assert "Batteries store energy." in cars.text and "evil" not in cars.text
    assert "No results" in call(tool, "search", {"query": "xylophone"}).text
    (corpus / "new.md").write_text("# Xylophones\n\nA xylophone has wooden bars.\n")
    out = call(tool, "search", {"query": "xylophone"})
    assert out.citations[0].url == "corpus://new.md"
    (corpus / "new.md").unlink()
    assert "No results" in call(tool, "search", {"query": "xylophone"}).text


def test_corpus_path_traversal_refused(corpus: Path, tmp_path: Path):
    (corpus / "link.txt").symlink_to(tmp_path / "secret.txt")
    tool = BrowserTool(LocalCorpus(corpus, rescan_interval_s=0))
    for bad in ["corpus://../secret.txt", "corpus:///etc/passwd", "corpus://%2e%2e/secret.txt",
                "corpus://cooking/../../secret.txt", "corpus://link.txt",
                "file:///etc/passwd", f"file://{tmp_path}/secret.txt"]:
        out = call(tool, "open", {"id": bad})
        assert not out.ok and "TOPSECRET" not in out.text, bad
        assert out.text.startswith("Error: "), out.text
    out = call(tool, "search", {"query": "TOPSECRET"})
    assert out.citations == [] and "No results for `TOPSECRET`" in out.text
    assert "only has the local corpus" in call(tool, "open", {"id": "https://example.com"}).text
    bare = call(tool, "open", {"id": "cooking/pasta.md"})
    assert bare.ok and bare.text.startswith("[") and "(corpus://cooking/pasta.md)" in bare.text
    assert "path outside the corpus" in call(tool, "open", {"id": "../secret.txt"}).text
    assert not call(tool, "open", {"id": "/etc/passwd"}).ok


def test_bad_arguments_are_reported_not_raised(corpus: Path):
    tool = BrowserTool(LocalCorpus(corpus))
    assert "must be a JSON object" in call(tool, "search", "{not json").text
    assert "query must be" in call(tool, "search", {"topn": 3}).text
    assert "no page is open" in call(tool, "open", {"id": 3}, conv="fresh").text
    call(tool, "search", {"query": "pasta"})
    assert "invalid link id 99" in call(tool, "open", {"id": 99}).text
    assert "invalid cursor 42" in call(tool, "find", {"pattern": "x", "cursor": 42}).text
    out = asyncio.run(tool.run(ToolInvocation("browser.delete", "{}", "c1")))
    assert not out.ok and "unknown browser function" in out.text


# -- SSRF ---------------------------------------------------------------------------------
def test_address_policy():
    import ipaddress as ip
    for bad in ["127.0.0.1", "10.0.0.1", "172.16.5.4", "192.168.1.1", "169.254.169.254",
                "0.0.0.0", "224.0.0.1", "100.64.0.1", "::1", "fe80::1", "fc00::1",
                "::ffff:127.0.0.1", "240.0.0.1"]:
        assert not address_allowed(ip.ip_address(bad)), bad
    assert address_allowed(ip.ip_address("1.1.1.1"))
    assert address_allowed(ip.ip_address("2606:4700:4700::1111"))


def test_ssrf_targets_refused_without_request():
    with serve({"/": (200, {"Content-Type": "text/plain"}, b"internal")}) as internal:
        fetcher = SafeFetcher(FetchConfig(timeout_s=3))
        for url in [internal.base + "/", f"http://localhost:{internal.port}/",
                    "http://169.254.169.254/latest/meta-data", "http://10.0.0.1/",
                    "http://[::1]/", f"http://[::ffff:127.0.0.1]:{internal.port}/",
                    "http://0.0.0.0/", "file:///etc/passwd", "ftp://example.com/x",
                    "gopher://127.0.0.1/", "http://user:pw@example.com/"]:
            with pytest.raises(FetchError) as err:
                asyncio.run(fetcher.get(url))
            assert "refused" in str(err.value), url
        assert internal.hits == []

        # through the tool, the model sees the reason
        tool = BrowserTool(SearxngBackend("http://127.0.0.1:9", fetcher=SafeFetcher()))
        out = call(tool, "open", {"id": internal.base + "/"})
        assert not out.ok and "non-public address (127.0.0.1)" in out.text
        out = call(tool, "open", {"id": "file:///etc/passwd"})
        assert not out.ok and "only http and https" in out.text
        assert internal.hits == []


@pytest.mark.parametrize("target", ["loopback", "metadata", "file"])
def test_redirect_into_private_refused(target: str):
    with serve({"/": (200, {"Content-Type": "text/plain"}, b"internal")}) as internal:
        dest = {"loopback": internal.base + "/",
                "metadata": "http://169.254.169.254/latest/meta-data",
                "file": "file:///etc/passwd"}[target]
        routes = {"/go": (302, {"Location": dest}, b""),
                  "/ok": (200, {"Content-Type": "text/html"},
                          b"<html><head><title>Fine</title></head><body><p>public page "
                          b"text</p></body></html>")}
        with serve(routes) as front:
            # only the front server's host:port is allowed; the redirect target is checked anew
            fetcher = SafeFetcher(FetchConfig(allow_hosts=frozenset({f"127.0.0.1:{front.port}"})))
            ok = asyncio.run(fetcher.get(front.base + "/ok"))
            assert ok.status == 200 and b"public page text" in ok.body
            with pytest.raises(FetchError) as err:
                asyncio.run(fetcher.get(front.base + "/go"))
            assert "refused" in str(err.value)
            assert front.hits == ["/ok", "/go"]
        assert internal.hits == []


def test_redirect_limit_and_body_cap():
    routes = {f"/r{i}": (302, {"Location": f"/r{i + 1}"}, b"") for i in range(10)}
    routes["/big"] = (200, {"Content-Type": "text/plain"}, b"x" * 50_000)
    with serve(routes) as s:
        fetcher = SafeFetcher(FetchConfig(allow_hosts=frozenset({f"127.0.0.1:{s.port}"}),
                                          max_redirects=3, max_bytes=10_000))
        with pytest.raises(FetchError, match="too many redirects"):
            asyncio.run(fetcher.get(s.base + "/r0"))
        assert s.hits == ["/r0", "/r1", "/r2", "/r3"]
        big = asyncio.run(fetcher.get(s.base + "/big"))
        assert big.truncated and len(big.body) == 10_000


# -- SearXNG backend against a fake instance ----------------------------------------------
def test_searxng_backend_search_open_find():
    page = (b"<html><head><title>Moon landing</title></head><body><article><h1>Apollo 11</h1>"
            b"<p>Apollo 11 landed on the Moon on July 20, 1969. Neil Armstrong stepped out "
            b"first.</p><p>Read <a href='/more'>more</a>.</p></article></body></html>")
    with serve({"/page": (200, {"Content-Type": "text/html; charset=utf-8"}, page)}) as site:
        results = {"results": [
            {"url": site.base + "/page", "title": "Apollo 11 - Moon landing",
             "content": "Apollo 11 landed on the Moon in 1969."},
            {"url": "https://example.org/other", "title": "Other", "content": "x"}]}
        body = json.dumps(results).encode()
        with serve({"/search": (200, {"Content-Type": "application/json"}, body)}) as searx:
            fetcher = SafeFetcher(FetchConfig(allow_hosts=frozenset({f"127.0.0.1:{site.port}"})))
            tool = BrowserTool(SearxngBackend(searx.base, fetcher=fetcher))
            out = call(tool, "search", {"query": "moon landing", "topn": 1})
            assert out.ok and "L0: # 【0†Apollo 11 - Moon landing†127.0.0.1】" in out.text
            assert len(out.citations) == 1
            assert searx.hits[0].startswith("/search?q=moon+landing&format=json")
            opened = call(tool, "open", {"id": 0})
            assert opened.ok, opened.text
            assert opened.text.startswith(f"[1] Moon landing ({site.base}/page)")
            assert "Neil Armstrong" in opened.text and "【0†more†127.0.0.1】" in opened.text
            found = call(tool, "find", {"pattern": "armstrong"})
            assert "match at L" in found.text
            call(tool, "open", {"id": 0, "cursor": 1})  # cached? a new fetch of /more (404)
            assert site.hits.count("/page") == 1  # the page cache served the second view
            _, cites = tool.annotate("landed 【1†L2】", "c1")
            assert cites[0].url == site.base + "/page" and cites[0].title == "Moon landing"
            asyncio.run(tool.aclose())


def test_html_fallback_without_trafilatura(monkeypatch: pytest.MonkeyPatch):
    import builtins

    from ossrt.tools.browser.html_text import html_to_text
    real_import = builtins.__import__

    def no_trafilatura(name: str, *a: object, **k: object):
        if name == "trafilatura":
            raise ImportError(name)
        return real_import(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", no_trafilatura)
    title, text = html_to_text("<html><head><title>T</title><style>x{}</style></head><body>"
                               "<h2>Sub</h2><p>Hi <a href='/a'>there</a></p><ul><li>one</li>"
                               "</ul></body></html>", "https://ex.com/p")
    assert title == "T"
    assert text == "## Sub\n\nHi [there](https://ex.com/a)\n\n- one"


def test_no_torch_or_server_imports():
    import subprocess
    import sys
    code = ("import sys, ossrt.tools, ossrt.tools.cli\n"
            "bad = [m for m in sys.modules if m == 'torch' or m.startswith(('ossrt.model', "
            "'ossrt.engine', 'ossrt.server'))]\nprint(bad)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={**os.environ}, timeout=60)
    assert out.stdout.strip() == "[]", out.stderr


def test_cli_browser(corpus: Path):
    import subprocess
    import sys
    ossrt = Path(sys.executable).parent / "ossrt"
    if not ossrt.exists():
        pytest.skip(f"console script not installed next to {sys.executable}")
    base = [str(ossrt), "tool", "browser", "--corpus", str(corpus)]
    out = subprocess.run(base + ["search", "Hindenburg Lakehurst"], capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines()[:4] == [
        "[0] Search results for `Hindenburg Lakehurst`", out.stdout.splitlines()[1], "",
        "L0: # 【0†The Hindenburg airship†corpus】"]
    out = subprocess.run(base + ["find", "lakehurst", "--url", "zeppelin.md"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.startswith(
        "[1] Find results for text: `lakehurst` in `The Hindenburg airship` "
        "(corpus://zeppelin.md)\n") and "# 【0†match at L42】" in out.stdout
    out = subprocess.run(base + ["open", "../secret.txt"], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 1 and "path outside the corpus" in out.stdout
