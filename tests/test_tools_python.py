"""The python tool's sandbox: escape attempts fail with the right reason; limits are reported."""

from __future__ import annotations

import asyncio
import os
import resource
import socket
import threading
from pathlib import Path

import pytest

from ossrt.tools import PythonSandboxConfig, PythonTool, ToolInvocation, sandbox_available

_AVAILABLE, _REASON = sandbox_available()
needs_bwrap = pytest.mark.skipif(not _AVAILABLE, reason=f"bubblewrap sandbox unavailable: {_REASON}")

FAST = PythonSandboxConfig(cpu_s=2, wall_s=4, memory_mb=256, max_procs=16,
                           max_output_bytes=20_000, file_size_mb=1)


def run(code: str, config: PythonSandboxConfig = FAST, conversation_id: str | None = None,
        tool: PythonTool | None = None):
    tool = tool or PythonTool(config)
    return asyncio.run(tool.run(ToolInvocation("python", code, conversation_id)))


def still_works(config: PythonSandboxConfig = FAST) -> None:
    out = run("print(1+1)", config)
    assert out.ok and out.text == "2\n", out


@needs_bwrap
def test_basic_output_and_notebook_echo():
    assert run("print(1+1)").text == "2\n"
    out = run("x = 21\nx * 2")
    assert out.ok and out.text == "42\n"
    out = run("import sys\nprint('a')\nprint('b', file=sys.stderr)\nraise SystemExit(3)")
    assert not out.ok and out.text == "a\nb\n" and out.meta["exit_code"] == 3
    out = run("1/0")
    assert not out.ok and "ZeroDivisionError" in out.text and "<string>" not in out.text


@needs_bwrap
def test_cannot_read_server_data_or_shadow(tmp_path: Path):
    data = tmp_path / "server-data"
    data.mkdir()
    (data / "secret.txt").write_text("TOPSECRET")
    os.chmod(tmp_path, 0o755)
    os.chmod(data, 0o755)
    os.chmod(data / "secret.txt", 0o644)  # world-readable on the host: only isolation protects it
    out = run(f"print(open({str(data / 'secret.txt')!r}).read())")
    assert not out.ok and "TOPSECRET" not in out.text and "FileNotFoundError" in out.text
    out = run("print(open('/etc/shadow').read())")
    assert not out.ok and "FileNotFoundError" in out.text
    out = run("import os; print(sorted(os.listdir('/')))")
    assert out.text.strip() == str(sorted(["bin", "dev", "etc", "lib", "lib64", "mnt", "proc",
                                           "sbin", "tmp", "usr"]
                                          if Path("/sbin").exists() else
                                          ["bin", "dev", "etc", "lib", "lib64", "mnt", "proc",
                                           "tmp", "usr"]))
    for home in ("/root", "/home"):
        assert "FileNotFoundError" in run(f"import os; os.listdir({home!r})").text
    still_works()


@needs_bwrap
def test_cannot_write_outside_workdir(tmp_path: Path):
    data = tmp_path / "server-data"
    data.mkdir()
    for target in ("/usr/x", "/etc/x", "/x", "/dev/x", str(data / "x")):
        out = run(f"open({target!r}, 'w').write('pwned')")
        assert not out.ok, target
        assert ("Read-only file system" in out.text or "Permission denied" in out.text
                or "No such file or directory" in out.text), out.text
    assert list(data.iterdir()) == []
    assert not Path("/usr/x").exists() and not Path("/etc/x").exists()
    out = run("open('/mnt/data/ok.txt','w').write('hi'); open('/tmp/t','w').write('x'); "
              "print(open('/mnt/data/ok.txt').read())")
    assert out.ok and out.text == "hi\n"
    still_works()


@needs_bwrap
def test_no_network():
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    listener.settimeout(0.5)
    port = listener.getsockname()[1]
    hits: list[object] = []

    def accept() -> None:
        try:
            hits.append(listener.accept())
        except OSError:
            pass

    th = threading.Thread(target=accept)
    th.start()
    try:
        out = run(f"import socket; socket.create_connection(('127.0.0.1', {port}), timeout=2)")
        assert not out.ok and "ConnectionRefusedError" in out.text, out.text
        out = run("import socket; socket.create_connection(('1.1.1.1', 53), timeout=2)")
        assert not out.ok and ("Network is unreachable" in out.text or "OSError" in out.text)
        out = run("import socket; socket.getaddrinfo('example.com', 80)")
        assert not out.ok and "gaierror" in out.text
    finally:
        th.join()
        listener.close()
    assert hits == []
    still_works()


@needs_bwrap
def test_fork_bomb_is_contained():
    code = ("import os, time\nn = 0\n"
            "try:\n"
            "    while True:\n"
            "        if os.fork() == 0:\n"
            "            time.sleep(30); os._exit(0)\n"
            "        n += 1\n"
            "except OSError as e:\n"
            "    print('stopped at', n, type(e).__name__)\n")
    out = run(code)
    assert "stopped at" in out.text and "BlockingIOError" in out.text, out.text
    assert int(out.text.split()[2]) < FAST.max_procs
    # children sleeping 30 s died with the sandbox (pid namespace): the call did not wait for them
    assert out.meta["exit_code"] == 0
    # a bomb that never stops is killed by the wall clock, and the host is unaffected
    out = run("import os\nwhile True:\n    try: os.fork()\n    except OSError: pass")
    assert not out.ok and ("wall time limit" in out.text or "cpu time limit" in out.text)
    still_works()


@needs_bwrap
def test_memory_cap():
    out = run("x = bytearray(1 << 30)")
    assert not out.ok and "MemoryError" in out.text and "[memory limit 256 MB reached]" in out.text
    out = run("l = []\nwhile True: l.append(bytearray(10 << 20))")
    assert not out.ok and "memory limit" in out.text
    still_works()


@needs_bwrap
def test_infinite_loop_cpu_and_wall():
    import dataclasses
    cpu = dataclasses.replace(FAST, cpu_s=1, wall_s=30)  # wall slack for a loaded machine
    out = run("while True: pass", cpu)
    assert not out.ok and "[killed: cpu time limit 1s exceeded]" in out.text, out.text
    out = run("import time; print('start'); time.sleep(60)")
    assert not out.ok and out.text.startswith("start\n")
    assert "[killed: wall time limit 4s exceeded]" in out.text
    still_works()


@needs_bwrap
def test_output_cap_does_not_blow_up_memory():
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    out = run("import sys\nwhile True: sys.stdout.write('x' * 1_000_000)")
    assert not out.ok and "[killed: output limit 20000 bytes exceeded]" in out.text
    assert len(out.text) < 21_000
    grew_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    assert grew_mb < 100
    still_works()


@needs_bwrap
def test_file_size_limit():
    out = run("open('big', 'wb').write(b'x' * (2 << 20))")
    assert not out.ok and "[file size limit 1 MB reached]" in out.text
    still_works()


@needs_bwrap
def test_stateless_by_default_and_stateful_keeps_files():
    tool = PythonTool(FAST)
    run("open('f.txt', 'w').write('1')", tool=tool, conversation_id="c1")
    assert "FileNotFoundError" in run("open('f.txt').read()", tool=tool, conversation_id="c1").text
    import dataclasses
    import shutil
    import tempfile
    # not under pytest's 0700 tmp_path: bwrap runs as the sandbox uid when we are root
    state = tempfile.mkdtemp(prefix="ossrt-test-state-")
    cfg = dataclasses.replace(FAST, stateful=True, state_dir=state)
    tool = PythonTool(cfg)
    assert run("open('f.txt', 'w').write('kept')", tool=tool, conversation_id="c1").ok
    out = run("print(open('f.txt').read())", tool=tool, conversation_id="c1")
    assert out.ok and out.text == "kept\n"
    other = run("import os; print(os.listdir('.'))", tool=tool, conversation_id="c2")
    assert other.text == "[]\n"
    tool.forget("c1")
    assert "FileNotFoundError" in run("open('f.txt').read()", tool=tool, conversation_id="c1").text
    shutil.rmtree(state)


def test_disabled_when_bwrap_missing():
    import dataclasses
    cfg = dataclasses.replace(FAST, bwrap="/nonexistent/bwrap")
    ok, reason = sandbox_available(cfg)
    assert not ok and "/nonexistent/bwrap" in reason
    out = run("print(1)", cfg)
    assert not out.ok and out.text.startswith("The python tool is disabled on this server")
    assert "bubblewrap not found" in out.text and out.error.startswith("python sandbox unavailable")


def test_unsafe_mode_runs_with_rlimits_and_says_so():
    import dataclasses
    cfg = dataclasses.replace(FAST, bwrap="/nonexistent/bwrap", unsafe=True, cpu_s=1, wall_s=30)
    out = run("print(6*7)", cfg)
    assert out.ok and out.text.startswith("42\n") and "WITHOUT a sandbox" in out.text
    assert out.meta["sandboxed"] is False
    out = run("while True: pass", cfg)
    assert not out.ok and "cpu time limit" in out.text
    out = run("x = bytearray(1 << 30)", cfg)
    assert "MemoryError" in out.text


def test_cli_python():
    import subprocess
    import sys
    ossrt = Path(sys.executable).parent / "ossrt"
    if not ossrt.exists():
        pytest.skip(f"console script not installed next to {sys.executable}")
    if not _AVAILABLE:
        pytest.skip(f"bubblewrap sandbox unavailable: {_REASON}")
    out = subprocess.run([str(ossrt), "tool", "python", "--code", "print(6*7)"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout == "42\n", out.stderr
