"""GET /jobs/{id} and GET /jobs/{id}/images/{index}."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response

from app.api.deps import JobsDep, StoreDep
from app.api.schemas import ERROR_RESPONSES, JobView
from app.core.errors import ConflictError, GoneError, NotFoundError
from app.core.jobs import JobStatus

router = APIRouter(prefix="/jobs", tags=["jobs"])


def _image_url(request: Request):
    return lambda job_id, i: str(request.url_for("get_image", job_id=job_id, index=str(i)))


@router.get("/{job_id}", response_model=JobView, responses=ERROR_RESPONSES, summary="Job status and results")
def get_job(job_id: str, request: Request, jobs: JobsDep) -> JobView:
    return jobs.view(jobs.get(job_id), _image_url(request))


@router.get(
    "/{job_id}/images/{index}",
    response_class=Response,
    responses={200: {"content": {"image/png": {}}, "description": "The PNG"}, **ERROR_RESPONSES},
    summary="One generated image (PNG with the parameters in text chunks)",
    name="get_image",
)
def get_image(job_id: str, index: str, request: Request, jobs: JobsDep, store: StoreDep) -> Response:
    job = jobs.get(job_id)
    view = jobs.view(job, _image_url(request))
    if view.status is not JobStatus.succeeded:
        if view.status.is_terminal():
            raise ConflictError(f"job {job.id} ended {view.status.value}; it has no images", code="job_not_succeeded")
        raise ConflictError(f"job {job.id} is {view.status.value}; images are ready when it succeeds", code="not_ready")
    if not index.isdigit() or int(index) >= len(view.images):
        raise NotFoundError(f"job {job.id} has {len(view.images)} image(s); no index {index!r}")
    png = store.get(job.id, int(index))
    if png is None:
        raise GoneError(f"image {index} of job {job.id} has expired")
    return Response(png, media_type="image/png", headers={"Cache-Control": "private, max-age=3600"})
