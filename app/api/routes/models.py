"""GET /models: the models live workers serve right now, with the defaults that fill requests."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.concurrency import run_in_threadpool
from pydantic import BaseModel, Field

from app.api.deps import RedisDep, SettingsDep
from app.api.schemas import ERROR_RESPONSES
from app.core.catalog import served_models
from app.core.jobs import ModelInfo

router = APIRouter(tags=["models"])

UNCLIP_FAMILIES = {"kandinsky-2.2"}  # variations from the input's CLIP image embedding


class ServedModel(ModelInfo):
    workers: int = Field(..., description="Live workers serving it now.")
    default: bool = Field(..., description="Jobs that name no model go here.")
    variations: str = Field(..., description="How POST /variations works on it: image_embedding or img2img.")


class ModelList(BaseModel):
    models: list[ServedModel]


@router.api_route("/models", methods=["HEAD"], include_in_schema=False)
@router.get(
    "/models",
    response_model=ModelList,
    responses={503: ERROR_RESPONSES[503]},
    summary="Models served by live workers",
)
async def list_models(redis: RedisDep, settings: SettingsDep) -> ModelList:
    """Only models with a live worker are listed; name one as `model` in POST /generate or
    POST /variations to route the job to it."""
    served = await run_in_threadpool(served_models, redis, settings.worker_heartbeat)
    return ModelList(
        models=[
            ServedModel(
                **info.model_dump(),
                workers=workers,
                default=name == settings.model,
                variations="image_embedding" if info.family in UNCLIP_FAMILIES else "img2img",
            )
            for name, (info, workers) in served.items()
        ]
    )
