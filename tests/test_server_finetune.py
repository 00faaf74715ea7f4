"""The Fine-tuning Jobs API through the official client, training the tiny model for real in
the worker process: a job succeeds and its model is served at once (add_adapter, /v1/models),
events and checkpoints, a malformed file is refused naming its line, cancel stops the worker,
and a job whose server died mid-training (worker killed -9) ends resumed, not `running`."""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import openai
import pytest
from test_server_chat import ScriptedEngine

from ossrt.harmony.tokenizer import get_tokenizer
from ossrt.model import preset, write_checkpoint
from ossrt.serve import ServeOptions, build_app
from ossrt.server.app import create_app
from ossrt.server.finetune import JobRunner
from ossrt.server.state import ModelCard, ServerState

BASE = "tiny"
CODES = {"apple": "red", "banana": "blue", "cherry": "green", "grape": "gold"}
# Small steps, a checkpoint every 2 of them: fast on a shared 2-core CPU.
CONFIG = {"max_seq_len": 128, "lora_rank": 4, "checkpoint_every": 2}


def _conversations() -> bytes:
    lines = [{"messages": [{"role": "user", "content": f"Code word for {k}{'?' * i}"},
                           {"role": "assistant", "content": v}]}
             for i in range(2) for k, v in CODES.items()]
    return b"".join(json.dumps(x).encode() + b"\n" for x in lines)


class Adapters:
    """The add_adapter hook: records what it was asked to serve, and what the folder held."""

    def __init__(self, real: Callable[[str, str], None] | None = None) -> None:
        self.calls: list[tuple[str, str, set[str]]] = []
        self.real = real

    def __call__(self, model_id: str, folder: str) -> None:
        self.calls.append((model_id, folder, {p.name for p in Path(folder).iterdir()}))
        if self.real is not None:
            self.real(model_id, folder)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("ft") / "tiny"
    write_checkpoint(preset("tiny"), path, seed=0)
    return path


def _app(data_dir: Path, checkpoint: Path, adapters: Adapters):  # noqa: ANN202 - FastAPI app
    state = ServerState(engine=ScriptedEngine(), tokenizer=get_tokenizer(),
                        models=[ModelCard(id=BASE, max_model_len=4096, vocab_size=201088)],
                        data_dir=str(data_dir), model_dir=str(checkpoint), add_adapter=adapters)
    state.jobs = JobRunner(state, config=CONFIG, threads=1, stop_grace_s=60)
    return create_app(state), state


@pytest.fixture(scope="module")
def served(live_server, checkpoint, tmp_path_factory) -> Iterator[tuple]:  # noqa: ANN001
    """`ossrt serve` for real (engine, add_adapter), with the hook recorded."""
    app = build_app(ServeOptions(model=str(checkpoint), dtype="float32",
                                 served_model_names=(BASE,), python_tool=False, browser=False,
                                 data_dir=str(tmp_path_factory.mktemp("data"))))
    state = app.state.ossrt
    adapters = Adapters(state.add_adapter)
    state.add_adapter = adapters
    state.jobs.store.close()  # the default runner (not started): one with the test's config
    state.jobs = JobRunner(state, config=CONFIG, threads=1, stop_grace_s=60)
    with live_server(app) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0)
        yield client, state, adapters


def _wait(client: openai.OpenAI, job_id: str, statuses: tuple[str, ...],
          timeout: float = 90) -> object:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = client.fine_tuning.jobs.retrieve(job_id)
        if job.status in statuses:
            return job
        time.sleep(0.2)
    raise AssertionError(f"{job_id} still {job.status}")


def _wait_event(client: openai.OpenAI, job_id: str, text: str, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if any(text in e.message for e in client.fine_tuning.jobs.list_events(job_id, limit=200)):
            return
        time.sleep(0.2)
    raise AssertionError(f"no event {text!r} for {job_id}")


def test_job_trains_and_serves_the_model(served) -> None:  # noqa: ANN001
    client, state, adapters = served
    f = client.files.create(file=("train.jsonl", _conversations()), purpose="fine-tune")
    job = client.fine_tuning.jobs.create(model=BASE, training_file=f.id, suffix="codes", seed=7,
                                         hyperparameters={"n_epochs": 2},
                                         metadata={"team": "a"})
    assert job.id.startswith("ftjob-") and job.object == "fine_tuning.job"
    assert job.status in ("queued", "running") and job.fine_tuned_model is None
    assert job.hyperparameters.n_epochs == 2 and job.hyperparameters.batch_size == 1
    assert job.seed == 7 and job.metadata == {"team": "a"} and job.method.type == "supervised"
    job = _wait(client, job.id, ("succeeded", "failed", "cancelled"))
    assert job.status == "succeeded", job.error
    assert job.error is None and job.finished_at >= job.created_at and job.trained_tokens > 0
    name = job.fine_tuned_model
    assert name.startswith(f"ft:{BASE}:codes:") and name.endswith(job.id.removeprefix("ftjob-"))
    assert name in [m.id for m in client.models.list()]
    assert client.models.retrieve(name).id == name
    [(served_id, folder, names)] = adapters.calls
    assert served_id == name and Path(folder).name == job.id
    assert {"adapter_config.json", "adapter_model.safetensors"} <= names
    answer = client.chat.completions.create(  # served at once, beside the base model
        model=name, messages=[{"role": "user", "content": "Code word for apple?"}],
        max_tokens=4, temperature=0)
    assert answer.model == name and answer.usage.completion_tokens > 0

    events = list(client.fine_tuning.jobs.list_events(job.id, limit=200))
    assert events[0].message == "The job has successfully completed"  # newest first
    metrics = [e for e in events if e.type == "metrics"]
    assert len(metrics) == 16 and metrics[0].data["step"] == 16
    assert all(e.object == "fine_tuning.job.event" and e.data["train_loss"] > 0
               for e in metrics)
    page = client.fine_tuning.jobs.list_events(job.id, limit=3)
    assert len(page.data) == 3 and page.has_more
    after = client.fine_tuning.jobs.list_events(job.id, limit=3, after=page.data[-1].id)
    assert after.data[0].id == events[3].id

    ckpts = list(client.fine_tuning.jobs.checkpoints.list(job.id))
    assert [c.step_number for c in ckpts][:3] == [16, 14, 12]
    assert ckpts[0].fine_tuned_model_checkpoint == f"{name}:ckpt-step-16"
    assert ckpts[0].metrics.train_loss > 0 and ckpts[0].fine_tuning_job_id == job.id
    assert job.id in [j.id for j in client.fine_tuning.jobs.list()]

    with pytest.raises(openai.BadRequestError):  # a fine-tuned model is not a base
        client.fine_tuning.jobs.create(model=name, training_file=f.id)


def test_bad_requests(served) -> None:  # noqa: ANN001
    client, _, _ = served
    bad = _conversations().split(b"\n")
    bad[2] = b'{"messages": [{"role": "user", "content": "hi"},'
    f = client.files.create(file=("bad.jsonl", b"\n".join(bad)), purpose="fine-tune")
    with pytest.raises(openai.BadRequestError) as err:
        client.fine_tuning.jobs.create(model=BASE, training_file=f.id)
    assert "line 3" in err.value.message and "line 2" not in err.value.message
    assert err.value.body["param"] == "training_file"
    assert err.value.body["code"] == "invalid_training_file"
    with pytest.raises(openai.NotFoundError) as err:
        client.fine_tuning.jobs.create(model="nope", training_file=f.id)
    assert err.value.body["code"] == "model_not_found"
    b = client.files.create(file=("b.jsonl", _conversations()), purpose="batch")
    with pytest.raises(openai.BadRequestError) as err:
        client.fine_tuning.jobs.create(model=BASE, training_file=b.id)
    assert "purpose" in err.value.message
    with pytest.raises(openai.BadRequestError):
        client.fine_tuning.jobs.create(model=BASE, training_file="file-missing")
    with pytest.raises(openai.BadRequestError) as err:
        client.fine_tuning.jobs.create(model=BASE, training_file=b.id, suffix="x" * 65)
    assert err.value.body["param"] == "suffix"
    with pytest.raises(openai.NotFoundError):
        client.fine_tuning.jobs.retrieve("ftjob-nope")


def test_cancel_stops_the_worker(served) -> None:  # noqa: ANN001
    client, state, adapters = served
    f = client.files.create(file=("train.jsonl", _conversations()), purpose="fine-tune")
    job = client.fine_tuning.jobs.create(model=BASE, training_file=f.id, method={
        "type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 50}}})
    assert job.hyperparameters.n_epochs == 50
    _wait_event(client, job.id, "Step 1/400")
    pid = state.jobs.worker_pid
    assert pid is not None
    job = client.fine_tuning.jobs.cancel(job.id)
    assert job.status == "cancelled"
    deadline = time.monotonic() + 30
    while state.jobs.worker_pid is not None and time.monotonic() < deadline:
        time.sleep(0.1)
    assert state.jobs.worker_pid is None  # the worker stopped
    assert client.fine_tuning.jobs.retrieve(job.id).status == "cancelled"
    assert not any(c[0] == job.fine_tuned_model for c in adapters.calls)
    with pytest.raises(openai.BadRequestError):  # a finished job cannot be cancelled
        client.fine_tuning.jobs.cancel(client.fine_tuning.jobs.list().data[-1].id)


def test_job_resumes_after_the_server_dies(live_server, checkpoint, tmp_path: Path) -> None:
    data = tmp_path / "data"
    adapters = Adapters()
    app, state = _app(data, checkpoint, adapters)
    with live_server(app) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0)
        f = client.files.create(file=("train.jsonl", _conversations()), purpose="fine-tune")
        job = client.fine_tuning.jobs.create(model=BASE, training_file=f.id,
                                             hyperparameters={"n_epochs": 6})
        _wait_event(client, job.id, "Checkpoint created at step 4")
        os.kill(state.jobs.worker_pid, signal.SIGKILL)  # the training dies mid-run ...
    # ... and the server with it (its runner was closed: the job stays `running`)
    adapters2 = Adapters()
    app2, state2 = _app(data, checkpoint, adapters2)
    with live_server(app2) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0)
        assert [x.id for x in client.files.list()] == [f.id]
        done = _wait(client, job.id, ("succeeded", "failed", "cancelled"))
        assert done.status == "succeeded", done.error
        messages = [e.message for e in client.fine_tuning.jobs.list_events(job.id, limit=500)]
        assert any(m.startswith("Resumed from the checkpoint at step") for m in messages)
        assert any("server restarted" in m or "process died" in m for m in messages)
        assert [c[0] for c in adapters2.calls] == [done.fine_tuned_model]
        assert done.fine_tuned_model in [m.id for m in client.models.list()]
    # A third start serves the finished model again at once.
    adapters3 = Adapters()
    app3, state3 = _app(data, checkpoint, adapters3)
    with live_server(app3) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0)
        assert done.fine_tuned_model in [m.id for m in client.models.list()]
        assert [c[0] for c in adapters3.calls] == [done.fine_tuned_model]
