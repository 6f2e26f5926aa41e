"""The ingress yardstick: a trivial FastAPI endpoint with the same request body as POST /generate,
validated by a small pydantic model and answered 202 without touching Redis."""

from __future__ import annotations

import uuid

from fastapi import FastAPI
from fastapi.responses import JSONResponse
from pydantic import BaseModel

app = FastAPI()


class Body(BaseModel):
    prompt: str
    seed: int | None = None
    width: int | None = None
    height: int | None = None
    num_inference_steps: int | None = None


@app.post("/generate")
def generate(body: Body) -> JSONResponse:
    return JSONResponse({"id": str(uuid.uuid4()), "status": "queued"}, status_code=202)
