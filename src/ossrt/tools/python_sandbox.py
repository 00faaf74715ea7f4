"""The `python` tool: runs the model's code in a bubblewrap sandbox with resource limits.

Guarantees when the sandbox is available (see docs/tools.md for the threat model):
- no network (`--unshare-net`: only a private loopback), no view of host processes (pid ns);
- a filesystem made of read-only /usr (with the /bin, /lib, /lib64 links), a minimal /etc
  (passwd/group naming the sandbox user, ld.so.cache, localtime, alternatives; no
  shadow), fresh /proc and /dev, a size-capped private tmpfs at /tmp and /dev/shm, and the
  working directory /mnt/data (a size-capped tmpfs, or in stateful mode the conversation's
  own host directory); the root is remounted read-only, so nothing else is writable, and
  nothing of /root, /home or the server's data directory exists inside;
- the code runs as an unprivileged uid with no capabilities, under RLIMIT_CPU, RLIMIT_AS,
  RLIMIT_NPROC (counted per sandbox: see `_spawn_user`), RLIMIT_FSIZE; plus a wall-clock
  timeout and an output cap enforced here, both of which kill the whole process group.

When the server runs as root, bwrap itself is started as `sandbox_uid` (default 65534,
"nobody"): a user namespace created by root maps the sandbox user to host uid 0, and the
kernel never applies RLIMIT_NPROC to host uid 0, so a fork bomb would not be bounded. This needs
unprivileged user namespaces (kernel.unprivileged_userns_clone / max_user_namespaces > 0).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import shutil
import signal
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from ._sandbox_runner import RUNNER
from .base import Tool, ToolInvocation, ToolOutput

WORKDIR = "/mnt/data"
_ETC_FILES = ("ld.so.cache", "localtime", "alternatives", "mime.types")


@dataclass(frozen=True, slots=True)
class PythonSandboxConfig:
    """Limits and locations of the python tool.

    cpu_s: RLIMIT_CPU seconds per process (SIGXCPU, then SIGKILL one second later).
    wall_s: wall-clock seconds for the whole call; then the process group is killed.
    memory_mb: RLIMIT_AS per process (allocations past it raise MemoryError).
    max_procs: RLIMIT_NPROC inside the sandbox (processes + threads).
    max_output_bytes: stdout+stderr bytes kept; past it the run is killed.
    file_size_mb: RLIMIT_FSIZE, the largest file the code may write.
    tmpfs_mb: size of /tmp, /dev/shm and (stateless) /mnt/data, each.
    python: interpreter run inside the sandbox (must live under /usr or in extra_ro_binds).
    bwrap: the bubblewrap binary.
    sandbox_uid/gid: unprivileged host ids bwrap runs as when the server is root.
    stateful: keep /mnt/data per conversation_id between calls (files only: each call is a
        fresh interpreter; variables do not survive). Calls without a conversation_id are
        always stateless.
    state_dir: where stateful directories live (default: $TMPDIR/ossrt-python-state).
    unsafe: run without bwrap (rlimits and uid drop only) when bwrap is unusable.
    echo_last_expr: print the repr of a final bare expression, like a notebook cell.
    extra_ro_binds: more host paths bound read-only at the same place (e.g. a venv).
    """

    cpu_s: int = 10
    wall_s: float = 15
    memory_mb: int = 512
    max_procs: int = 32
    max_output_bytes: int = 64_000
    file_size_mb: int = 16
    tmpfs_mb: int = 64
    python: str = "/usr/bin/python3"
    bwrap: str = "/usr/bin/bwrap"
    sandbox_uid: int = 65534
    sandbox_gid: int = 65534
    stateful: bool = False
    state_dir: str | None = None
    unsafe: bool = False
    echo_last_expr: bool = True
    extra_ro_binds: tuple[str, ...] = field(default_factory=tuple)


_probe_cache: dict[tuple[str, str, bool], tuple[bool, str]] = {}


def _is_root() -> bool:
    return os.geteuid() == 0


def _spawn_user(cfg: PythonSandboxConfig) -> dict[str, object]:
    """Popen kwargs that drop root to the sandbox ids (nothing when not root)."""
    if not _is_root():
        return {}
    return {"user": cfg.sandbox_uid, "group": cfg.sandbox_gid, "extra_groups": []}


def _bwrap_argv(cfg: PythonSandboxConfig, etc_dir: str, workdir: str | None) -> list[str]:
    """The bwrap command line up to (not including) the command run inside.

    workdir: host folder bound at /mnt/data (bwrap, which runs as the sandbox uid when the
    server is root, must be able to traverse its parents); None: a fresh size-capped tmpfs.
    """
    tmpfs = str(cfg.tmpfs_mb << 20)
    argv = [cfg.bwrap, "--unshare-all", "--unshare-user", "--unshare-net",
            "--die-with-parent", "--new-session", "--cap-drop", "ALL",
            "--uid", str(cfg.sandbox_uid), "--gid", str(cfg.sandbox_gid),
            "--ro-bind", "/usr", "/usr"]
    for name in ("bin", "lib", "lib64", "sbin"):
        p = Path("/") / name
        if p.is_symlink():
            argv += ["--symlink", os.readlink(p), str(p)]
        elif p.is_dir():
            argv += ["--ro-bind", str(p), str(p)]
    for name in os.listdir(etc_dir):
        argv += ["--ro-bind", os.path.join(etc_dir, name), f"/etc/{name}"]
    for name in _ETC_FILES:
        p = Path("/etc") / name
        if p.exists():
            argv += ["--ro-bind", str(p), str(p)]
    for p in cfg.extra_ro_binds:
        argv += ["--ro-bind", p, p]
    argv += ["--proc", "/proc", "--dev", "/dev",
             "--size", tmpfs, "--tmpfs", "/dev/shm",
             "--size", tmpfs, "--tmpfs", "/tmp"]
    if workdir is None:
        argv += ["--size", tmpfs, "--tmpfs", WORKDIR]
    else:
        argv += ["--bind", workdir, WORKDIR]
    argv += ["--remount-ro", "/", "--remount-ro", "/dev",
             "--chdir", WORKDIR, "--setenv", "HOME", WORKDIR, "--setenv", "TMPDIR", "/tmp",
             "--setenv", "PATH", "/usr/local/bin:/usr/bin:/bin", "--unsetenv", "PYTHONPATH"]
    return argv


def _make_etc(cfg: PythonSandboxConfig, parent: str) -> str:
    """A private folder with just passwd and group naming the sandbox user."""
    etc = tempfile.mkdtemp(prefix="etc-", dir=parent)
    Path(etc, "passwd").write_text(
        f"sandbox:x:{cfg.sandbox_uid}:{cfg.sandbox_gid}:sandbox:{WORKDIR}:/usr/sbin/nologin\n")
    Path(etc, "group").write_text(f"sandbox:x:{cfg.sandbox_gid}:\n")
    Path(etc, "hostname").write_text("sandbox\n")
    for name in os.listdir(etc):
        os.chmod(os.path.join(etc, name), 0o644)
    os.chmod(etc, 0o755)
    return etc


def _runner_argv(cfg: PythonSandboxConfig) -> list[str]:
    return [cfg.python, "-I", "-u", "-c", RUNNER, str(cfg.cpu_s), str(cfg.memory_mb << 20),
            str(cfg.max_procs), str(cfg.file_size_mb << 20), str(int(cfg.echo_last_expr))]


def sandbox_available(config: PythonSandboxConfig | None = None) -> tuple[bool, str]:
    """Whether bwrap can run the sandbox here; probed once per (bwrap, python, root).

    Returns (True, "ok") or (False, reason). The probe runs `print(1)` in the full sandbox.
    """
    cfg = config or PythonSandboxConfig()
    key = (cfg.bwrap, cfg.python, _is_root())
    if key in _probe_cache:
        return _probe_cache[key]
    result = _probe(cfg)
    _probe_cache[key] = result
    return result


def _probe(cfg: PythonSandboxConfig) -> tuple[bool, str]:
    import subprocess

    if not (os.path.isfile(cfg.bwrap) and os.access(cfg.bwrap, os.X_OK)):
        return False, f"bubblewrap not found at {cfg.bwrap} (apt install bubblewrap)"
    if not os.path.isfile(cfg.python):
        return False, f"python interpreter not found at {cfg.python}"
    parent = tempfile.mkdtemp(prefix="ossrt-py-probe-")
    try:
        os.chmod(parent, 0o755)
        etc = _make_etc(cfg, parent)
        argv = _bwrap_argv(cfg, etc, None) + [cfg.python, "-I", "-c", "print(1)"]
        try:
            proc = subprocess.run(argv, capture_output=True, timeout=20, stdin=subprocess.DEVNULL,
                                  **_spawn_user(cfg))  # type: ignore[call-overload]
        except (OSError, subprocess.SubprocessError) as exc:
            return False, f"bubblewrap failed to start: {exc}"
        if proc.returncode != 0 or proc.stdout.strip() != b"1":
            err = proc.stderr.decode("utf-8", "replace").strip()[-300:]
            return False, f"bubblewrap cannot create the sandbox here (exit {proc.returncode}: {err})"
        return True, "ok"
    finally:
        shutil.rmtree(parent, ignore_errors=True)


@dataclass(slots=True)
class _RunResult:
    stdout: bytes
    stderr: bytes
    returncode: int | None
    killed: str | None


class PythonTool(Tool):
    """The `python` tool (Harmony recipient "python").

    `run` executes `call.args` as Python source and returns stdout, then stderr, then a
    bracketed note for any limit hit, e.g. "[killed: wall time limit 15s exceeded]".
    ok is False when the code failed (non-zero exit), a limit was hit, or the sandbox is
    unavailable (then text explains, and nothing runs).
    """

    name = "python"

    def __init__(self, config: PythonSandboxConfig | None = None) -> None:
        self.config = config or PythonSandboxConfig()
        self._locks: dict[str, asyncio.Lock] = {}

    def available(self) -> tuple[bool, str]:
        """(usable, reason): True when bwrap works, or unsafe mode is on."""
        ok, reason = sandbox_available(self.config)
        if ok or self.config.unsafe:
            return True, reason if ok else f"unsafe mode (no sandbox: {reason})"
        return False, reason

    def _state_root(self) -> Path:
        root = Path(self.config.state_dir or Path(tempfile.gettempdir()) / "ossrt-python-state")
        root.mkdir(parents=True, exist_ok=True, mode=0o700)
        if _is_root():  # bwrap runs as the sandbox uid and must reach the folders inside
            os.chown(root, self.config.sandbox_uid, self.config.sandbox_gid)
        return root

    def state_path(self, conversation_id: str) -> Path:
        """The host folder behind /mnt/data for a conversation in stateful mode."""
        digest = hashlib.sha256(conversation_id.encode()).hexdigest()[:32]
        return self._state_root() / digest

    def forget(self, conversation_id: str) -> None:
        """Delete a conversation's stateful files (no-op when there are none)."""
        shutil.rmtree(self.state_path(conversation_id), ignore_errors=True)
        self._locks.pop(conversation_id, None)

    async def run(self, call: ToolInvocation) -> ToolOutput:
        cfg = self.config
        sandboxed, reason = sandbox_available(cfg)
        if not sandboxed and not cfg.unsafe:
            return ToolOutput.failure(
                f"python sandbox unavailable: {reason}",
                text=f"The python tool is disabled on this server: {reason}.",
                sandboxed=False)
        stateful = cfg.stateful and call.conversation_id is not None
        lock = (self._locks.setdefault(call.conversation_id, asyncio.Lock())
                if stateful and call.conversation_id is not None else contextlib.nullcontext())
        async with lock:
            try:
                res = await self._execute(call, sandboxed, stateful)
            except OSError as exc:  # could not create folders or start the process
                return ToolOutput.failure(f"python tool could not start: {exc}")
        if sandboxed and res.returncode == 1 and res.stderr.startswith(b"bwrap: "):
            reason = res.stderr.decode("utf-8", "replace").strip()
            return ToolOutput.failure(f"sandbox setup failed: {reason}",
                                      text=f"The python sandbox could not start: {reason}")
        text, notes = self._format(res)
        meta = {"exit_code": res.returncode, "sandboxed": sandboxed, "stateful": stateful}
        if not sandboxed:
            notes.insert(0, f"[warning: ran WITHOUT a sandbox (unsafe mode): {reason}]")
        if notes:
            text = (text + ("\n" if text and not text.endswith("\n") else "") + "\n".join(notes))
        if res.killed:
            return ToolOutput(text=text, ok=False, error=res.killed, meta=meta)
        if res.returncode != 0:
            return ToolOutput(text=text, ok=False, error=f"exit code {res.returncode}", meta=meta)
        return ToolOutput(text=text, meta=meta)

    def _format(self, res: _RunResult) -> tuple[str, list[str]]:
        cfg = self.config
        out = res.stdout.decode("utf-8", "replace")
        err = res.stderr.decode("utf-8", "replace")
        text = out
        if err:
            text += ("\n" if out and not out.endswith("\n") else "") + err
        notes: list[str] = []
        if res.killed:
            notes.append(f"[killed: {res.killed}]")
        elif res.returncode is not None and res.returncode > 128:
            sig = res.returncode - 128
            if sig == signal.SIGXCPU:
                res.killed = f"cpu time limit {cfg.cpu_s}s exceeded"
            elif sig == signal.SIGKILL:
                res.killed = (f"killed by SIGKILL (cpu time limit {cfg.cpu_s}s "
                              f"or memory exhausted)")
            elif sig == signal.SIGXFSZ:
                res.killed = f"file size limit {cfg.file_size_mb} MB exceeded"
            else:
                res.killed = f"terminated by signal {signal.Signals(sig).name}"
            notes.append(f"[killed: {res.killed}]")
        if "MemoryError" in err[-2000:]:
            notes.append(f"[memory limit {cfg.memory_mb} MB reached]")
            res.killed = res.killed or f"memory limit {cfg.memory_mb} MB reached"
        if "File too large" in err[-2000:]:
            notes.append(f"[file size limit {cfg.file_size_mb} MB reached]")
        if "Resource temporarily unavailable" in err[-2000:] and "fork" in err[-2000:]:
            notes.append(f"[process limit {cfg.max_procs} reached]")
        return text, notes

    async def _execute(self, call: ToolInvocation, sandboxed: bool, stateful: bool) -> _RunResult:
        cfg = self.config
        parent = tempfile.mkdtemp(prefix="ossrt-py-")
        try:
            os.chmod(parent, 0o755)
            workdir: str | None = None
            if stateful and call.conversation_id is not None:
                workdir = str(self.state_path(call.conversation_id))
                os.makedirs(workdir, mode=0o700, exist_ok=True)
            elif not sandboxed:
                workdir = tempfile.mkdtemp(prefix="work-", dir=parent)
            if workdir is not None and _is_root():
                os.chown(workdir, cfg.sandbox_uid, cfg.sandbox_gid)
            if sandboxed:
                argv = _bwrap_argv(cfg, _make_etc(cfg, parent), workdir) + _runner_argv(cfg)
                cwd = parent
            else:
                argv, cwd = _runner_argv(cfg), workdir
            env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": cwd or "/", "LANG": "C.UTF-8"}
            return await self._communicate(argv, cwd, env, call.args.encode("utf-8", "replace"))
        finally:
            shutil.rmtree(parent, ignore_errors=True)

    async def _communicate(self, argv: list[str], cwd: str | None, env: dict[str, str],
                           code: bytes) -> _RunResult:
        cfg = self.config
        proc = await asyncio.create_subprocess_exec(
            *argv, cwd=cwd, env=env, stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
            start_new_session=True, **_spawn_user(cfg))  # type: ignore[arg-type]
        bufs = {"out": bytearray(), "err": bytearray()}
        killed: list[str] = []

        def kill(reason: str) -> None:
            if not killed:
                killed.append(reason)
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)

        async def pump(stream: asyncio.StreamReader, key: str) -> None:
            while True:
                chunk = await stream.read(65536)
                if not chunk:
                    return
                room = cfg.max_output_bytes - len(bufs["out"]) - len(bufs["err"])
                bufs[key] += chunk[:max(room, 0)]
                if len(chunk) > room:  # keep draining (and discarding) until the pipe closes
                    kill(f"output limit {cfg.max_output_bytes} bytes exceeded")

        async def feed() -> None:
            assert proc.stdin is not None
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                proc.stdin.write(code)
                await proc.stdin.drain()
            proc.stdin.close()

        assert proc.stdout is not None and proc.stderr is not None
        work = asyncio.gather(feed(), pump(proc.stdout, "out"), pump(proc.stderr, "err"))
        try:
            await asyncio.wait_for(asyncio.shield(work), timeout=cfg.wall_s)
        except asyncio.TimeoutError:
            kill(f"wall time limit {cfg.wall_s:g}s exceeded")
        except BaseException:
            kill("cancelled")
            raise
        finally:
            if killed and not work.done():
                # The pipes close once the killed group is gone; orphaned grandchildren that
                # left the group (possible in unsafe mode only) may hold them open: stop then.
                with contextlib.suppress(asyncio.TimeoutError, asyncio.CancelledError, Exception):
                    await asyncio.wait_for(work, timeout=2)
        try:
            rc = await asyncio.wait_for(proc.wait(), timeout=5)
            if rc < 0:  # killed by a signal (unsafe mode; bwrap itself reports 128 + signal)
                rc = 128 - rc
        except asyncio.TimeoutError:
            kill("did not exit")
            rc = None
        return _RunResult(bytes(bufs["out"]), bytes(bufs["err"]), rc, killed[0] if killed else None)
