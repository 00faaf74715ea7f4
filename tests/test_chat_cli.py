"""`ossrt chat` under a pseudo-terminal against a real `ossrt serve` of the tiny preset, plus
the event renderer on scripted events (reasoning, tools, errors)."""

from __future__ import annotations

import io
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace as NS

import httpx
import pytest

pexpect = pytest.importorskip("pexpect")

BIN = Path(sys.executable).parent
PROMPT = "you> "
DONE = r"\[(?:incomplete: \w+, )?\d+ tokens, [\d.]+ s\]"  # the footer of a finished turn
RESP_ID = re.compile(r"resp_[0-9a-f]+")


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory):
    tmp = tmp_path_factory.mktemp("chat")
    ckpt = tmp / "tiny"
    subprocess.run([str(BIN / "ossrt"), "make-checkpoint", "--preset", "tiny", "--out",
                    str(ckpt)], check=True, capture_output=True, timeout=120)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    log = open(tmp / "server.log", "wb")  # noqa: SIM115 - closed below
    proc = subprocess.Popen([str(BIN / "ossrt"), "serve", "--model", str(ckpt), "--port",
                             str(port), "--data-dir", str(tmp / "data")],
                            stdout=log, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 90
    try:
        while True:
            assert proc.poll() is None, (tmp / "server.log").read_text()
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "the server did not start"
            time.sleep(0.2)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


def _spawn(url: str, *extra: str):
    env = dict(os.environ, TERM="dumb", OMP_NUM_THREADS="1")
    child = pexpect.spawn(str(BIN / "ossrt"), ["chat", "--url", url, "--max-output-tokens", "40",
                                                *extra], env=env, encoding="utf-8",
                          timeout=60, dimensions=(50, 200))
    child.expect_exact(PROMPT)
    return child


def _turn(child, text: str) -> str:
    child.sendline(text)
    child.expect(DONE)
    out = child.before
    child.expect_exact(PROMPT)
    return out


def _history_ids(child) -> list[str]:
    child.sendline("/history")
    child.expect_exact(PROMPT)
    firsts = [m.group(1) for m in re.finditer(r"^\s*\d+\. (\S+)", child.before, re.M)]
    return [i if RESP_ID.fullmatch(i) else None for i in firsts]  # "-": no id


def test_chat_session(server: str) -> None:
    child = _spawn(server)
    try:
        out = _turn(child, "hello there")
        assert out.strip()  # some (random) text streamed

        child.sendline("/effort low")
        child.expect_exact("effort: low")
        child.expect_exact(PROMPT)
        _turn(child, "second")
        ids = _history_ids(child)
        assert len(ids) == 2 and all(ids)
        r2 = httpx.get(f"{server}/v1/responses/{ids[1]}").json()
        assert r2["reasoning"]["effort"] == "low"
        assert r2["previous_response_id"] == ids[0]  # the history chains

        child.sendline("/reset")
        child.expect_exact("history cleared")
        child.expect_exact(PROMPT)
        _turn(child, "third")
        ids = _history_ids(child)
        r3 = httpx.get(f"{server}/v1/responses/{ids[2]}").json()
        assert r3["previous_response_id"] is None
        assert r3["reasoning"]["effort"] == "low"

        # Ctrl-C mid-stream stops that generation and returns to the prompt
        child.sendline("/max 4000")
        child.expect_exact("max output tokens: 4000")
        child.expect_exact(PROMPT)
        child.sendline("a long answer please")
        child.expect_exact("a long answer please")
        child.expect(r"\S{3}", timeout=60)  # streaming has begun
        time.sleep(0.5)
        child.sendintr()
        child.expect_exact("[interrupted]", timeout=30)
        child.expect_exact(PROMPT)
        child.sendline("/max 40")
        child.expect_exact(PROMPT)
        assert _turn(child, "still there?").strip()  # a following turn works
        ids = _history_ids(child)
        assert len(ids) == 5 and ids[3] is not None
        # the interrupted turn was not stored, so the next one chains to the turn before it
        r5 = httpx.get(f"{server}/v1/responses/{ids[4]}").json()
        assert r5["previous_response_id"] == ids[2]

        child.sendline("/quit")
        child.expect(pexpect.EOF, timeout=30)
    finally:
        child.close(force=True)
    assert child.exitstatus == 0


def test_ctrl_c_at_prompt_tools_error_and_ctrl_d(server: str) -> None:
    child = _spawn(server, "--hide-reasoning", "--no-color")
    try:
        child.sendintr()  # at the empty prompt: just a new prompt
        child.expect_exact(PROMPT)
        assert "\x1b[" not in _turn(child, "plain")  # --no-color
        child.sendline("/tools on")
        child.expect_exact("tools: on")
        child.expect_exact(PROMPT)
        # last, as it may upset the server: whatever it answers (a 400 when it has the built-in
        # tools off, a turn, an error), the client shows it and comes back to the prompt
        child.sendline("run some python")
        child.expect(["error: ", DONE], timeout=90)
        child.expect_exact(PROMPT, timeout=60)
        assert "Traceback" not in child.before
        child.sendeof()
        child.expect(pexpect.EOF, timeout=30)
    finally:
        child.close(force=True)
    assert child.exitstatus == 0


# -- the renderer, on scripted events -----------------------------------------------------------

class _FakeStream:
    def __init__(self, events: list) -> None:
        self.events, self.closed = events, False

    def __iter__(self):
        return iter(self.events)

    def close(self) -> None:
        self.closed = True


class _FakeClient:
    def __init__(self, events: list | Exception) -> None:
        self.events, self.calls, self.streams = events, [], []
        self.responses = NS(create=self._create)

    def _create(self, **kw):
        self.calls.append(kw)
        if isinstance(self.events, Exception):
            raise self.events
        self.streams.append(_FakeStream(self.events))
        return self.streams[-1]


def _resp(status: str = "completed", rid: str = "resp_1", tokens: int = 5):
    return NS(id=rid, status=status, usage=NS(output_tokens=tokens), error=None,
              incomplete_details=None)


SCRIPT = [
    NS(type="response.created", response=NS(id="resp_1")),
    NS(type="response.output_item.added", item=NS(type="reasoning", id="rs_1")),
    NS(type="response.reasoning_text.delta", delta="let me "),
    NS(type="response.reasoning_text.delta", delta="think"),
    NS(type="response.output_item.added", item=NS(type="code_interpreter_call", id="ci_1")),
    NS(type="response.code_interpreter_call.in_progress", item_id="ci_1"),
    NS(type="response.code_interpreter_call_code.done", item_id="ci_1", code="print(6*7)"),
    NS(type="response.output_item.done", item=NS(type="code_interpreter_call", id="ci_1",
                                                 code="print(6*7)", outputs=[NS(logs="42\n")])),
    NS(type="response.web_search_call.searching", item_id="ws_1"),
    NS(type="response.output_item.done", item=NS(type="web_search_call", id="ws_1",
                                                 action=NS(type="search", query="gpt-oss"))),
    NS(type="response.output_text.delta", delta="The answer "),
    NS(type="response.output_text.delta", delta="is 42."),
    NS(type="response.completed", response=_resp()),
]


def _session(client, **kw):
    from ossrt.chat_cli import ChatSession

    return ChatSession(client=client, model="m", out=io.StringIO(), **kw)


def test_render_reasoning_tools_and_chaining() -> None:
    client = _FakeClient(SCRIPT)
    s = _session(client, tools=True, effort="high")
    turn = s.send("hi")
    out = s.out.getvalue()
    assert "\x1b[2mlet me \x1b[0m" in out  # reasoning, dimmed
    assert "[python] running..." in out and "print(6*7)" in out and "42" in out
    assert "[browser] searching..." in out and "[browser] search: gpt-oss" in out
    assert "The answer is 42." in out and "[5 tokens," in out
    assert turn.status == "completed" and s.previous_id == "resp_1"
    assert client.streams[0].closed
    kw = client.calls[0]
    assert kw["stream"] and kw["store"] and kw["reasoning"] == {"effort": "high"}
    assert [t["type"] for t in kw["tools"]] == ["code_interpreter", "web_search_preview"]
    assert "previous_response_id" not in kw
    s.send("again")
    assert client.calls[1]["previous_response_id"] == "resp_1"
    s.command("/reset")
    s.send("fresh")
    assert "previous_response_id" not in client.calls[2]


def test_render_hidden_reasoning_no_color() -> None:
    s = _session(_FakeClient(SCRIPT), show_reasoning=False, color=False)
    s.send("hi")
    out = s.out.getvalue()
    assert "[thought for 2 tokens]" in out and "let me" not in out and "\x1b[" not in out


def test_api_error_is_shown_not_raised() -> None:
    import openai

    req = httpx.Request("POST", "http://x/v1/responses")
    err = openai.BadRequestError(
        "Error code: 400", response=httpx.Response(400, request=req),
        body={"message": "tool type 'code_interpreter' is not supported", "type": "x"})
    s = _session(_FakeClient(err))
    turn = s.send("hi")
    assert "error: tool type 'code_interpreter' is not supported" in s.out.getvalue()
    assert turn.status == "error" and s.previous_id is None
    lines = iter(["/effort nope", "/bogus", "hello", "/quit"])
    assert s.repl(read=lambda _p: next(lines)) == 0
    assert "usage: /effort" in s.out.getvalue() and "unknown command /bogus" in s.out.getvalue()
