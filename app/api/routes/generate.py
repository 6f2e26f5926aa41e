"""POST /generate: validate a request and put it on the queue."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response, status

from app.api.deps import JobsDep
from app.api.schemas import ERROR_RESPONSES, GenerateRequest, JobView

router = APIRouter(tags=["generate"])


@router.post(
    "/generate",
    status_code=status.HTTP_202_ACCEPTED,
    response_model=JobView,
    responses=ERROR_RESPONSES,
    summary="Submit a text-to-image job",
)
def generate(body: GenerateRequest, request: Request, response: Response, jobs: JobsDep) -> JobView:
    """Queue a job and answer at once with 202, a `Location` to poll and the job as JSON."""
    job = jobs.submit(body)
    response.headers["Location"] = f"/jobs/{job.id}"
    return jobs.view(job, lambda job_id, i: str(request.url_for("get_image", job_id=job_id, index=str(i))))
