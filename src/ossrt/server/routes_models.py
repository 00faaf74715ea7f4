"""GET /v1/models and /v1/models/{id}."""

from __future__ import annotations

from fastapi import APIRouter, Request

router = APIRouter()


@router.get("/v1/models")
async def list_models(request: Request) -> dict:
    state = request.app.state.ossrt
    return {"object": "list", "data": [m.to_api() for m in state.models]}


@router.get("/v1/models/{model_id:path}")
async def get_model(model_id: str, request: Request) -> dict:
    return request.app.state.ossrt.model(model_id, param="model_id").to_api()
