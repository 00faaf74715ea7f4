"""The FastAPI application: OpenAI-compatible routes over an `EngineClient`."""

from __future__ import annotations

from fastapi import FastAPI, Request

from . import auth as gateway
from . import errors
from .batches import BatchRunner
from .batches import router as batches_router
from .deadline import TimedEngine
from .errors import not_found
from .files import DEFAULT_MAX_FILE_BYTES, FileStore
from .files import router as files_router
from .finetune import JobRunner
from .finetune import router as finetune_router
from .limits import DEFAULT_MAX_BODY_BYTES, BodyLimit, lifespan_for
from .routes_chat import router as chat_router
from .routes_completions import router as completions_router
from .routes_models import router as models_router
from .routes_responses import router as responses_router
from .state import ServerState

UNSUPPORTED = {
    "/v1/embeddings": "embeddings",
    "/v1/images/generations": "image generation",
    "/v1/images/edits": "image editing",
    "/v1/images/variations": "image variations",
    "/v1/audio/speech": "speech generation",
    "/v1/audio/transcriptions": "audio transcription",
    "/v1/audio/translations": "audio translation",
    "/v1/moderations": "moderation",
    "/v1/videos": "video generation",
    "/v1/realtime": "the Realtime API",
}


def create_app(state: ServerState, *, max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
               max_file_bytes: int = DEFAULT_MAX_FILE_BYTES) -> FastAPI:
    """The app; on shutdown it closes `state.engine` and `state.store` (when they have a
    `close`). Request bodies over `max_body_bytes` get a 413 before they are parsed (uploads to
    /v1/files: files over `max_file_bytes`). With `state.data_dir` it keeps files; with
    `state.model_dir` too it runs fine-tuning jobs (`state.jobs`, started with the app); with
    a data dir it also runs batches (`state.batches`, the Batch API's runner)."""
    app = FastAPI(title="ossrt", description="OpenAI-compatible server for gpt-oss",
                  lifespan=lifespan_for(state))
    if state.request_timeout:  # every route's generations get the deadline
        state.engine = TimedEngine(state.engine, state.request_timeout)
    app.state.ossrt = state
    app.state.files = FileStore(state.data_dir, max_file_bytes) if state.data_dir else None
    if state.jobs is None and state.data_dir and state.model_dir:
        state.jobs = JobRunner(state)
    if state.batches is None and app.state.files is not None:
        state.batches = BatchRunner(state, app, app.state.files)
    errors.install(app)
    gateway.install(app, state)  # API keys, rate limits, /metrics, access log, x-request-id
    app.add_middleware(BodyLimit, max_body_bytes=max_body_bytes,  # outermost: before all reads
                       path_limits={"/v1/files": max_file_bytes + (1 << 20)})  # + form overhead
    app.include_router(models_router)
    app.include_router(completions_router)
    app.include_router(chat_router)
    app.include_router(responses_router)
    app.include_router(files_router)
    app.include_router(finetune_router)
    app.include_router(batches_router)

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok"}

    for path, what in UNSUPPORTED.items():
        def make(what: str = what):  # noqa: ANN202 - one handler per unsupported endpoint
            async def unsupported(request: Request) -> None:
                raise not_found(f"gpt-oss is a text-only model: it does not do {what}. "
                                "This server serves /v1/chat/completions, /v1/responses and "
                                "/v1/completions.", code="unsupported_endpoint")
            return unsupported
        app.add_api_route(path, make(), methods=["GET", "POST"], include_in_schema=False)
    return app
