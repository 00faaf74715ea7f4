"""The Fine-tuning Jobs API: LoRA jobs on the served base model, run in a worker process.

- `JobStore`: `data_dir/jobs.sqlite3` (WAL) with the jobs, their events and checkpoints.
- `JobRunner`: one job at a time, FIFO. Each job runs in its own "spawn" worker process that
  calls `ossrt.train.trainer.finetune(..., resume=True)` on `data_dir/fine_tuning/<job_id>/`
  and sends the trainer's events back over a multiprocessing queue; a thread of the server
  drains them into the store. A job outlives the request that created it and never blocks the
  event loop; cancelling sets an event the trainer checks before every step.
- On success the adapter is served at once: `state.add_adapter(model_id, adapter_dir)` and a
  `ModelCard` in `state.models`, under `ft:<base>:<suffix or ossrt>:<job hex>`.
- Restarts: at `start()` the models of succeeded jobs are registered again, and jobs a dead
  (or stopped) server left `running` are queued again; the trainer resumes them from their
  latest checkpoint. A worker that dies is retried up to `max_attempts` times in all, then
  the job fails with an error: a job is never left `running` by a live server.

The HTTP side imports neither torch nor `ossrt.train`: the training file is checked for its
structure here (JSON, messages, roles: 400 naming the line), fully (rendering) in the worker,
where a `DataError` fails the job with the line numbers in `error.message`.
"""

from __future__ import annotations

import asyncio
import json
import logging
import multiprocessing as mp
import os
import queue
import re
import secrets
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from fastapi import APIRouter, Query, Request
from pydantic import BaseModel, ConfigDict, Field

from .errors import APIError, invalid, not_found
from .files import NO_DATA_DIR, file_store
from .sqlite_db import SQLiteDB
from .state import ModelCard, ServerState

log = logging.getLogger(__name__)

DB_NAME = "jobs.sqlite3"
OUT_FOLDER = "fine_tuning"
ACTIVE = ("validating_files", "queued", "running")
FINISHED = ("succeeded", "failed", "cancelled")
ROLES = ("system", "developer", "user", "assistant", "tool")
# What "auto" means (and the learning rate a multiplier scales); `JobRunner(config=...)`
# overrides these and sets any other `TrainConfig` field for every job.
AUTO = {"epochs": 3, "batch_size": 1, "learning_rate": 1e-3}
RUNNER_DEFAULTS: dict[str, Any] = {"progress": False, "checkpoint_every": 50}

_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY, status TEXT NOT NULL, attempts INTEGER NOT NULL DEFAULT 0,
    job TEXT NOT NULL, config TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS events (
    seq INTEGER PRIMARY KEY AUTOINCREMENT, id TEXT NOT NULL UNIQUE, job_id TEXT NOT NULL,
    event TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS events_job ON events (job_id, seq);
CREATE TABLE IF NOT EXISTS checkpoints (
    seq INTEGER PRIMARY KEY AUTOINCREMENT, id TEXT NOT NULL UNIQUE, job_id TEXT NOT NULL,
    step INTEGER NOT NULL, checkpoint TEXT NOT NULL, UNIQUE (job_id, step));
"""


def _now() -> int:
    return int(time.time())


def _plain(event: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in event.items() if k != "event"}


def _error(code: str, message: str, param: str | None = None) -> dict[str, Any]:
    return {"code": code, "message": message, "param": param}


# ---------------------------------------------------------------- store


class JobStore(SQLiteDB):
    """Jobs (their API objects, status and attempts), events and checkpoints; thread-safe."""

    def __init__(self, data_dir: str | Path) -> None:
        super().__init__(data_dir, DB_NAME, _SCHEMA)

    def create(self, job: dict[str, Any], config: dict[str, Any]) -> None:
        with self._tx() as db:
            db.execute("INSERT INTO jobs (id, status, job, config) VALUES (?, ?, ?, ?)",
                       (job["id"], job["status"], json.dumps(job), json.dumps(config)))

    def get(self, job_id: str) -> dict[str, Any] | None:
        rows = self._read("SELECT job FROM jobs WHERE id = ?", (job_id,))
        return json.loads(rows[0][0]) if rows else None

    def config(self, job_id: str) -> dict[str, Any]:
        return json.loads(self._read("SELECT config FROM jobs WHERE id = ?", (job_id,))[0][0])

    def update(self, job_id: str, only_from: tuple[str, ...] | None = None,
               **fields: Any) -> dict[str, Any] | None:
        """Sets `fields` of the job (when its status is in `only_from`, if given); returns
        the new job, or None when it does not exist or its status did not match."""
        with self._tx() as db:
            row = db.execute("SELECT job FROM jobs WHERE id = ?", (job_id,)).fetchone()
            if row is None:
                return None
            job = json.loads(row[0])
            if only_from is not None and job["status"] not in only_from:
                return None
            job.update(fields)
            db.execute("UPDATE jobs SET job = ?, status = ? WHERE id = ?",
                       (json.dumps(job), job["status"], job_id))
        return job

    def begin(self, job_id: str) -> int | None:
        """queued -> running, counting the attempt; None when the job is not queued."""
        with self._tx() as db:
            row = db.execute("SELECT job, attempts FROM jobs WHERE id = ?",
                             (job_id,)).fetchone()
            if row is None or json.loads(row[0])["status"] != "queued":
                return None
            job = {**json.loads(row[0]), "status": "running"}
            db.execute("UPDATE jobs SET job = ?, status = ?, attempts = ? WHERE id = ?",
                       (json.dumps(job), "running", row[1] + 1, job_id))
        return int(row[1]) + 1

    def with_status(self, *statuses: str) -> list[dict[str, Any]]:
        marks = ", ".join("?" * len(statuses))
        rows = self._read(f"SELECT job FROM jobs WHERE status IN ({marks}) ORDER BY rowid",
                          statuses)
        return [json.loads(r[0]) for r in rows]

    def _page(self, table: str, column: str, where: str, args: tuple, limit: int,
              after: str | None) -> tuple[list[dict[str, Any]], bool]:
        """Newest first; `after` is the id of the last item of the previous page."""
        key = "rowid" if table == "jobs" else "seq"
        if after is not None:
            rows = self._read(f"SELECT {key} FROM {table} WHERE id = ?", (after,))
            if not rows:
                return [], False
            where, args = f"{where} AND {key} < ?", (*args, rows[0][0])
        rows = self._read(f"SELECT {column} FROM {table} WHERE {where} ORDER BY {key} DESC "
                          "LIMIT ?", (*args, limit + 1))
        return [json.loads(r[0]) for r in rows[:limit]], len(rows) > limit

    def list(self, limit: int = 20, after: str | None = None) -> tuple[list[dict], bool]:
        return self._page("jobs", "job", "1", (), limit, after)

    def add_event(self, job_id: str, message: str, data: dict[str, Any] | None = None,
                  level: str = "info", type: str = "message") -> None:
        event = {"object": "fine_tuning.job.event", "id": "ftevent-" + secrets.token_hex(12),
                 "created_at": _now(), "level": level, "message": message, "data": data or {},
                 "type": type}
        with self._tx() as db:
            db.execute("INSERT INTO events (id, job_id, event) VALUES (?, ?, ?)",
                       (event["id"], job_id, json.dumps(event)))

    def events(self, job_id: str, limit: int = 20,
               after: str | None = None) -> tuple[list[dict], bool]:
        return self._page("events", "event", "job_id = ?", (job_id,), limit, after)

    def add_checkpoint(self, job_id: str, step: int, model_id: str,
                       metrics: dict[str, Any]) -> None:
        ckpt = {"object": "fine_tuning.job.checkpoint", "id": "ftckpt-" + secrets.token_hex(12),
                "created_at": _now(), "fine_tuned_model_checkpoint": f"{model_id}:ckpt-step-{step}",
                "fine_tuning_job_id": job_id, "metrics": metrics, "step_number": step}
        with self._tx() as db:  # a resumed run redoes steps: the newer checkpoint wins
            db.execute("INSERT OR REPLACE INTO checkpoints (id, job_id, step, checkpoint) "
                       "VALUES (?, ?, ?, ?)", (ckpt["id"], job_id, step, json.dumps(ckpt)))

    def checkpoints(self, job_id: str, limit: int = 10,
                    after: str | None = None) -> tuple[list[dict], bool]:
        return self._page("checkpoints", "checkpoint", "job_id = ?", (job_id,), limit, after)


# ---------------------------------------------------------------- the worker process


def _exit_with_parent() -> None:
    """A worker must not outlive its server (a kill -9 of the server leaves it orphaned,
    training on the folder the next server resumes from): exit as soon as the parent does."""
    parent = mp.parent_process()
    if parent is None:
        return

    def watch() -> None:
        parent.join()
        os._exit(3)
    threading.Thread(target=watch, name="ossrt-parent-watch", daemon=True).start()


def run_worker(spec: dict[str, Any], events: Any, cancel: Any) -> None:
    """The worker process: one job. Puts the trainer's events on `events`, then a last
    `{"event": "_result", ...}` or `{"event": "_error", ...}`."""
    _exit_with_parent()
    try:
        import torch

        if spec.get("threads"):
            torch.set_num_threads(int(spec["threads"]))
        from ..train.data import DataError
        from ..train.trainer import TrainConfig, finetune

        raw = dict(spec["config"])
        if "targets" in raw:
            raw["targets"] = tuple(raw["targets"])
        cfg = TrainConfig(**raw)
    except Exception as exc:  # noqa: BLE001 - reported as the job's error
        events.put({"event": "_error", "code": "invalid_config",
                    "message": f"{type(exc).__name__}: {exc}", "param": None})
        return
    try:
        result = finetune(spec["model_dir"], spec["train_path"], spec["out"], cfg,
                          validation_file=spec.get("validation_path"), dtype=spec["dtype"],
                          device=spec["device"], on_event=events.put, cancel=cancel,
                          resume=True)
    except DataError as exc:
        val = exc.path == spec.get("validation_path")
        names = {spec["train_path"]: spec["training_file"]}
        if spec.get("validation_path"):
            names[spec["validation_path"]] = spec["validation_file"]
        message = str(exc)
        for path, file_id in names.items():
            message = message.replace(path, file_id)
        events.put({"event": "_error", "message": message,
                    "code": "invalid_validation_file" if val else "invalid_training_file",
                    "param": "validation_file" if val else "training_file"})
        return
    except Exception as exc:  # noqa: BLE001 - reported as the job's error
        log.exception("fine-tuning failed")
        events.put({"event": "_error", "code": "training_failed",
                    "message": f"{type(exc).__name__}: {exc}", "param": None})
        return
    events.put({"event": "_result", "cancelled": result.cancelled, "steps": result.steps,
                "adapter_dir": str(result.adapter_dir) if result.adapter_dir else None})


# ---------------------------------------------------------------- the runner


class JobRunner:
    """`JobRunner(state, config=..., dtype=..., device=..., threads=...)`: `config` sets
    `TrainConfig` fields for every job (and what "auto" means: epochs, batch_size,
    learning_rate); `threads` caps the worker's torch threads. `start()` recovers and starts
    the scheduler; `close()` stops it (a running job stays `running` and resumes next start)."""

    def __init__(self, state: ServerState, *, config: Mapping[str, Any] | None = None,
                 dtype: str = "float32", device: str = "cpu", threads: int | None = None,
                 max_attempts: int = 3, stop_grace_s: float = 10.0) -> None:
        if not state.data_dir or not state.model_dir:
            raise ValueError("fine-tuning needs both state.data_dir and state.model_dir")
        self.state = state
        self.data_dir = Path(state.data_dir)
        self.model_dir = str(state.model_dir)
        self.config = {**RUNNER_DEFAULTS, **AUTO, **(config or {})}
        self.dtype, self.device, self.threads = dtype, device, threads
        self.max_attempts, self.stop_grace_s = max_attempts, stop_grace_s
        self.store = JobStore(self.data_dir)
        self._queue: queue.Queue[str] = queue.Queue()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._current: tuple[str, Any, Any] | None = None  # (job id, process, cancel event)
        self._ctx = mp.get_context("spawn")

    # -- lifecycle

    def start(self) -> None:
        if self._thread is not None:
            return
        for job in self.store.with_status("succeeded"):
            try:
                self._register(job)
            except Exception:  # noqa: BLE001 - the others still load
                log.exception("cannot serve %s again", job.get("fine_tuned_model"))
        for job in self.store.with_status("validating_files", "running"):
            self.store.update(job["id"], status="queued")
            self.store.add_event(job["id"], "The server restarted; the job is queued again and "
                                 "resumes from its latest checkpoint.")
        for job in self.store.with_status("queued"):
            self._queue.put(job["id"])
        self._thread = threading.Thread(target=self._loop, name="ossrt-finetune", daemon=True)
        self._thread.start()

    def close(self) -> None:
        """Stops the scheduler and the worker (asked to checkpoint first, for up to
        `stop_grace_s`); the running job stays `running`, to resume at the next start."""
        self._stop.set()
        with self._lock:
            current = self._current
        if current is not None:
            _, proc, cancel = current
            cancel.set()
            proc.join(self.stop_grace_s)
            if proc.is_alive():
                proc.kill()
                proc.join(5)
        if self._thread is not None:
            self._thread.join(15)
        self.store.close()

    @property
    def worker_pid(self) -> int | None:
        """The pid of the worker process training now (None when idle)."""
        with self._lock:
            return self._current[1].pid if self._current else None

    def out_dir(self, job_id: str) -> Path:
        return self.data_dir / OUT_FOLDER / job_id

    # -- what the routes call (blocking: through asyncio.to_thread)

    def create(self, job: dict[str, Any], config: dict[str, Any]) -> dict[str, Any]:
        self.store.create(job, config)
        self.store.add_event(job["id"], f"Created fine-tuning job: {job['id']}")
        self._queue.put(job["id"])
        return job

    def cancel(self, job_id: str) -> dict[str, Any] | None:
        job = self.store.get(job_id)
        if job is None or job["status"] == "cancelled":
            return job
        if job["status"] in FINISHED:
            raise invalid(f"Job {job_id} has already {job['status']}; it cannot be cancelled.",
                          param="fine_tuning_job_id", code="job_finished")
        job = self.store.update(job_id, only_from=ACTIVE, status="cancelled",
                                finished_at=_now())
        if job is None:  # it finished meanwhile
            return self.store.get(job_id)
        self.store.add_event(job_id, "Job cancelled.", level="warn")
        with self._lock:
            if self._current is not None and self._current[0] == job_id:
                self._current[2].set()
        return job

    # -- the scheduler thread

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                job_id = self._queue.get(timeout=0.2)
            except queue.Empty:
                continue
            try:
                self._run(job_id)
            except Exception as exc:  # noqa: BLE001 - the job fails, the runner goes on
                log.exception("fine-tuning job %s", job_id)
                if not self._stop.is_set():
                    self._fail(job_id, _error("internal_error", f"{type(exc).__name__}: {exc}"))
            finally:
                with self._lock:
                    self._current = None

    def _fail(self, job_id: str, error: dict[str, Any]) -> None:
        if self.store.update(job_id, only_from=ACTIVE, status="failed", error=error,
                             finished_at=_now()) is not None:
            self.store.add_event(job_id, f"Job failed: {error['message']}", level="error")

    def _run(self, job_id: str) -> None:
        attempt = self.store.begin(job_id)
        if attempt is None:  # cancelled while queued, or gone
            return
        if attempt > self.max_attempts:
            self._fail(job_id, _error("worker_died", f"The training process died "
                                      f"{attempt - 1} times; giving up."))
            return
        job = self.store.get(job_id)
        assert job is not None
        out = self.out_dir(job_id)
        out.mkdir(parents=True, exist_ok=True)
        files = self.data_dir / "files"
        spec = {"model_dir": self.model_dir, "out": str(out), "config": self.store.config(job_id),
                "dtype": self.dtype, "device": self.device, "threads": self.threads,
                "training_file": job["training_file"],
                "train_path": str(files / job["training_file"]),
                "validation_file": job["validation_file"],
                "validation_path": str(files / job["validation_file"])
                if job["validation_file"] else None}
        events, cancel = self._ctx.Queue(), self._ctx.Event()
        proc = self._ctx.Process(target=run_worker, args=(spec, events, cancel), daemon=True,
                                 name=f"ossrt-finetune-{job_id}")
        with self._lock:
            self._current = (job_id, proc, cancel)
        self.store.add_event(job_id, "Fine-tuning job started." if attempt == 1 else
                             f"Fine-tuning job started again (attempt {attempt}).")
        proc.start()
        if self._stop.is_set() or (self.store.get(job_id) or {}).get("status") != "running":
            cancel.set()  # cancelled, or the server began to stop, between begin() and now
        track: dict[str, Any] = {"model": job["fine_tuned_model_pending"]}
        final: dict[str, Any] | None = None
        while True:
            try:
                ev = events.get(timeout=0.25)
            except queue.Empty:
                if proc.is_alive():
                    continue
                while True:  # what it put just before exiting
                    try:
                        ev = events.get(timeout=0.5)
                    except queue.Empty:
                        break
                    final = self._safe_event(job_id, ev, track) or final
                break
            final = self._safe_event(job_id, ev, track) or final
        proc.join()
        events.close()
        self._settle(job_id, job, attempt, final, proc.exitcode, track)

    def _settle(self, job_id: str, job: dict[str, Any], attempt: int,
                final: dict[str, Any] | None, exitcode: int | None,
                track: dict[str, Any]) -> None:
        now = self.store.get(job_id)
        if now is None or now["status"] != "running":
            return  # cancelled by the user: it stays cancelled
        if self._stop.is_set():
            self.store.add_event(job_id, "The server stopped; the job resumes from its latest "
                                 "checkpoint when it starts again.", level="warn")
            return
        if final is None:
            if attempt < self.max_attempts:
                self.store.update(job_id, only_from=("running",), status="queued")
                self.store.add_event(job_id, f"The training process died (exit code "
                                     f"{exitcode}); resuming from the latest checkpoint.",
                                     level="warn")
                self._queue.put(job_id)
            else:
                self._fail(job_id, _error("worker_died", f"The training process died (exit "
                                          f"code {exitcode}) {attempt} times; giving up."))
            return
        if final["event"] == "_error":
            self._fail(job_id, _error(final["code"], final["message"], final.get("param")))
            return
        if final["cancelled"]:  # asked to stop, but not by the user nor a shutdown
            self.store.update(job_id, only_from=("running",), status="cancelled",
                              finished_at=_now())
            return
        model_id = job["fine_tuned_model_pending"]
        done = {**job, "fine_tuned_model": model_id}
        try:
            served = self._register(done)
        except Exception as exc:  # noqa: BLE001 - the adapter is there, but cannot be served
            log.exception("serving %s failed", model_id)
            self._fail(job_id, _error("adapter_load_failed", f"The adapter was trained but "
                                      f"cannot be served: {type(exc).__name__}: {exc}"))
            return
        tokens = track.get("trained_tokens")
        epochs = job["hyperparameters"]["n_epochs"]
        if self.store.update(job_id, only_from=("running",), status="succeeded",
                             fine_tuned_model=model_id, finished_at=_now(),
                             trained_tokens=tokens * epochs if tokens is not None else None,
                             result_files=[]) is None:
            return
        where = self.out_dir(job_id)
        self.store.add_event(job_id, f"New fine-tuned model created: {model_id}" if served else
                             f"New fine-tuned model created: {model_id}; this server cannot "
                             f"load adapters, the adapter is in {where}", data={
                                 "fine_tuned_model": model_id})
        self.store.add_event(job_id, "The job has successfully completed")

    def _safe_event(self, job_id: str, ev: dict[str, Any],
                    track: dict[str, Any]) -> dict[str, Any] | None:
        try:
            return self._on_event(job_id, ev, track)
        except Exception:  # noqa: BLE001 - a bad event must not orphan the worker
            log.exception("recording event %r of %s", ev, job_id)
            return None

    def _on_event(self, job_id: str, ev: dict[str, Any],
                  track: dict[str, Any]) -> dict[str, Any] | None:
        """Records one trainer event; returns the worker's final message, if it is one."""
        kind = ev.get("event")
        add = self.store.add_event
        if kind in ("_result", "_error"):
            return ev
        if kind == "data":
            track["trained_tokens"] = ev.get("trained_tokens")
            extra = "".join(f", {ev[k]} {k}" for k in ("truncated", "dropped") if ev.get(k))
            add(job_id, f"Files validated: {ev['examples']} examples, {ev['tokens']} tokens "
                f"({ev['trained_tokens']} trained){extra}.", data=_plain(ev))
        elif kind == "start":
            track["total_steps"] = ev.get("total_steps")
            if ev.get("resumed_from"):
                add(job_id, f"Resumed from the checkpoint at step {ev['resumed_from']} of "
                    f"{ev['total_steps']}.", data=_plain(ev))
            else:
                add(job_id, f"Training started: {ev['total_steps']} steps, "
                    f"{ev['trainable_parameters']} trainable parameters.", data=_plain(ev))
        elif kind == "step":
            track["train_loss"] = ev["loss"]
            data = {"step": ev["step"], "train_loss": ev["loss"], "total_steps":
                    ev["total_steps"], "epoch": ev.get("epoch"), "learning_rate": ev.get("lr"),
                    "tokens_per_second": ev.get("tokens_per_second")}
            add(job_id, f"Step {ev['step']}/{ev['total_steps']}: training loss="
                f"{ev['loss']:.4f}", data=data, type="metrics")
        elif kind == "eval":
            track["valid_loss"] = ev["val_loss"]
            add(job_id, f"Step {ev['step']}: validation loss={ev['val_loss']:.4f}",
                data={"step": ev["step"], "valid_loss": ev["val_loss"]}, type="metrics")
        elif kind in ("checkpoint", "done"):
            metrics = {"step": float(ev["step"]), "train_loss": track.get("train_loss")}
            if track.get("valid_loss") is not None:
                metrics["valid_loss"] = track["valid_loss"]
            self.store.add_checkpoint(job_id, int(ev["step"]), track["model"], metrics)
            add(job_id, f"Checkpoint created at step {ev['step']}" if kind == "checkpoint" else
                f"Training finished at step {ev['step']}.", data={"step": ev["step"]})
        elif kind == "cancelled":
            add(job_id, f"Training stopped at step {ev['step']} (checkpoint saved).",
                data={"step": ev["step"]})
        return None

    def _register(self, job: dict[str, Any]) -> bool:
        """Serves a finished job's adapter; False when this server cannot load adapters."""
        model_id = job["fine_tuned_model"]
        if self.state.add_adapter is None:
            return False
        self.state.add_adapter(model_id, str(self.out_dir(job["id"])))
        if any(card.id == model_id for card in self.state.models):
            return True
        base = next((c for c in self.state.models if c.id == job["model"]),
                    self.state.models[0] if self.state.models else ModelCard(id=job["model"]))
        self.state.models.append(ModelCard(
            id=model_id, max_model_len=base.max_model_len, vocab_size=base.vocab_size,
            note=f"LoRA fine-tune of {job['model']} ({job['id']})", adapter=model_id,
            parent=job["model"]))
        return True


# ---------------------------------------------------------------- light data check


def check_jsonl(path: str | Path, max_problems: int = 10) -> list[tuple[int, str]]:
    """The structure of a chat fine-tuning JSONL file, without the tokenizer or torch: every
    line a JSON object with a non-empty `messages` list of objects with a known role, and at
    least one assistant message. The worker renders it fully (and reports what this misses)."""
    problems: list[tuple[int, str]] = []
    examples = 0
    try:
        with open(path, encoding="utf-8") as f:
            for n, line in enumerate(f, start=1):
                if len(problems) >= max_problems:
                    break
                if not line.strip():
                    continue
                why = _line_problem(line.rstrip("\r\n"))
                if why:
                    problems.append((n, why))
                else:
                    examples += 1
    except (OSError, UnicodeDecodeError) as exc:
        return [(0, f"cannot read the file: {exc}")]
    if not problems and not examples:
        problems.append((0, "the file has no examples"))
    return problems


def _line_problem(line: str) -> str | None:
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as exc:
        return f"invalid JSON ({exc.msg} at column {exc.colno})"
    if not isinstance(obj, dict):
        return "line is not a JSON object"
    msgs = obj.get("messages")
    if not isinstance(msgs, list) or not msgs:
        return "'messages' must be a non-empty list"
    for i, m in enumerate(msgs):
        if not isinstance(m, dict):
            return f"messages[{i}] is not an object"
        if m.get("role") not in ROLES:
            return (f"messages[{i}].role {m.get('role')!r} is unknown (expected one of "
                    f"{', '.join(ROLES)})")
    if not any(m.get("role") == "assistant" for m in msgs):
        return "no assistant message to train on"
    return None


# ---------------------------------------------------------------- routes

router = APIRouter()


class Hyperparameters(BaseModel):
    model_config = ConfigDict(extra="forbid")
    n_epochs: Literal["auto"] | int = Field("auto")
    batch_size: Literal["auto"] | int = Field("auto")
    learning_rate_multiplier: Literal["auto"] | float = Field("auto")


class Supervised(BaseModel):
    hyperparameters: Hyperparameters | None = None


class Method(BaseModel):
    type: Literal["supervised", "dpo", "reinforcement"]
    supervised: Supervised | None = None


class JobRequest(BaseModel):
    model: str
    training_file: str
    validation_file: str | None = None
    hyperparameters: Hyperparameters | None = None
    method: Method | None = None
    suffix: str | None = Field(None, max_length=64)
    seed: int | None = Field(None, ge=0, le=2**31 - 1)
    metadata: dict[str, str] | None = None
    integrations: list[Any] | None = None


def _runner(request: Request) -> JobRunner:
    state: ServerState = request.app.state.ossrt
    if not state.data_dir:
        raise invalid(NO_DATA_DIR, code="no_data_dir")
    if state.jobs is None:
        raise invalid("This server cannot fine-tune: it was started without a base checkpoint "
                      "folder (model_dir).", code="fine_tuning_unavailable")
    return state.jobs


def _job_missing(job_id: str) -> APIError:
    return not_found(f"Could not find fine-tuning job: {job_id}", param="fine_tuning_job_id",
                     code="fine_tuning_job_not_found")


async def _check_file(request: Request, file_id: str, param: str) -> None:
    store = file_store(request)
    what = param.removesuffix("_file")
    code = f"invalid_{param}"
    rec = await asyncio.to_thread(store.get, file_id)
    if rec is None:
        raise invalid(f"Invalid file format for {what}: no such File object {file_id}.",
                      param=param, code=code)
    if rec.purpose != "fine-tune":
        raise invalid(f"File {file_id} has purpose '{rec.purpose}'; fine-tuning needs purpose "
                      "'fine-tune'.", param=param, code=code)
    problems = await asyncio.to_thread(check_jsonl, store.path(file_id))
    if problems:
        listed = "; ".join(f"line {n}: {why}" if n else why for n, why in problems)
        raise invalid(f"The {what} file {file_id} is invalid: {listed}", param=param, code=code)


def _resolve(body: JobRequest, runner: JobRunner) -> tuple[dict[str, Any], dict[str, Any]]:
    """(the job's resolved hyperparameters, the TrainConfig fields of its worker)."""
    hp = body.hyperparameters
    if body.method is not None:
        if body.method.type != "supervised":
            raise invalid(f"Fine-tuning method '{body.method.type}' is not supported; only "
                          "'supervised' (LoRA) is.", param="method.type")
        if body.method.supervised and body.method.supervised.hyperparameters:
            if hp is not None:
                raise invalid("Give hyperparameters either at the top level or in method, "
                              "not both.", param="hyperparameters")
            hp = body.method.supervised.hyperparameters
    hp = hp or Hyperparameters()
    base = runner.config
    epochs = base["epochs"] if hp.n_epochs == "auto" else hp.n_epochs
    batch = base["batch_size"] if hp.batch_size == "auto" else hp.batch_size
    mult = 1.0 if hp.learning_rate_multiplier == "auto" else float(hp.learning_rate_multiplier)
    for name, value, top in (("n_epochs", epochs, 50), ("batch_size", batch, 256)):
        if not 1 <= value <= top:
            raise invalid(f"hyperparameters.{name} must be between 1 and {top}.",
                          param=f"hyperparameters.{name}")
    if not 0 < mult <= 100:
        raise invalid("hyperparameters.learning_rate_multiplier must be in (0, 100].",
                      param="hyperparameters.learning_rate_multiplier")
    seed = body.seed if body.seed is not None else secrets.randbelow(2**31)
    config = {**base, "epochs": epochs, "batch_size": batch,
              "learning_rate": base["learning_rate"] * mult, "seed": seed}
    return {"n_epochs": epochs, "batch_size": batch, "learning_rate_multiplier": mult}, config


@router.post("/v1/fine_tuning/jobs")
async def create_job(body: JobRequest, request: Request) -> dict:
    state: ServerState = request.app.state.ossrt
    runner = _runner(request)
    card = state.model(body.model)
    if card.id.startswith("ft:") or getattr(card, "adapter", None):
        raise invalid(f"'{card.id}' is a fine-tuned model; fine-tune its base model instead.",
                      param="model", code="model_not_available")
    if body.suffix is not None and not re.fullmatch(r"[A-Za-z0-9._-]{1,64}", body.suffix):
        raise invalid("suffix may only hold letters, digits, '.', '_' and '-' (1 to 64).",
                      param="suffix")
    if body.integrations:
        raise invalid("Integrations are not supported by this server.", param="integrations")
    hyper, config = _resolve(body, runner)
    await _check_file(request, body.training_file, "training_file")
    if body.validation_file:
        await _check_file(request, body.validation_file, "validation_file")
    hexid = secrets.token_hex(12)
    job_id = "ftjob-" + hexid
    job = {"object": "fine_tuning.job", "id": job_id, "model": card.id,
           "created_at": _now(), "finished_at": None, "fine_tuned_model": None,
           "organization_id": "ossrt", "result_files": [], "status": "queued",
           "validation_file": body.validation_file, "training_file": body.training_file,
           "hyperparameters": hyper, "trained_tokens": None, "error": None,
           "seed": config["seed"], "estimated_finish": None, "integrations": [],
           "metadata": body.metadata, "user_provided_suffix": body.suffix,
           "method": {"type": "supervised", "supervised": {"hyperparameters": hyper}},
           "fine_tuned_model_pending": f"ft:{card.id}:{body.suffix or 'ossrt'}:{hexid}"}
    return _public(await asyncio.to_thread(runner.create, job, config))


def _public(job: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in job.items() if k != "fine_tuned_model_pending"}


@router.get("/v1/fine_tuning/jobs")
async def list_jobs(request: Request, limit: int = Query(20, ge=1, le=100),
                    after: str | None = None) -> dict:
    jobs, more = await asyncio.to_thread(_runner(request).store.list, limit, after)
    return {"object": "list", "data": [_public(j) for j in jobs], "has_more": more}


@router.get("/v1/fine_tuning/jobs/{job_id}")
async def retrieve_job(job_id: str, request: Request) -> dict:
    job = await asyncio.to_thread(_runner(request).store.get, job_id)
    if job is None:
        raise _job_missing(job_id)
    return _public(job)


@router.post("/v1/fine_tuning/jobs/{job_id}/cancel")
async def cancel_job(job_id: str, request: Request) -> dict:
    job = await asyncio.to_thread(_runner(request).cancel, job_id)
    if job is None:
        raise _job_missing(job_id)
    return _public(job)


@router.get("/v1/fine_tuning/jobs/{job_id}/events")
async def job_events(job_id: str, request: Request, limit: int = Query(20, ge=1, le=1000),
                     after: str | None = None) -> dict:
    store = _runner(request).store
    if await asyncio.to_thread(store.get, job_id) is None:
        raise _job_missing(job_id)
    events, more = await asyncio.to_thread(store.events, job_id, limit, after)
    return {"object": "list", "data": events, "has_more": more}


@router.get("/v1/fine_tuning/jobs/{job_id}/checkpoints")
async def job_checkpoints(job_id: str, request: Request, limit: int = Query(10, ge=1, le=100),
                          after: str | None = None) -> dict:
    store = _runner(request).store
    if await asyncio.to_thread(store.get, job_id) is None:
        raise _job_missing(job_id)
    ckpts, more = await asyncio.to_thread(store.checkpoints, job_id, limit, after)
    return {"object": "list", "data": ckpts, "has_more": more,
            "first_id": ckpts[0]["id"] if ckpts else None,
            "last_id": ckpts[-1]["id"] if ckpts else None}
