"""imagegen_client: Python client (`Client`, `AsyncClient`) and the `imagegen` CLI for the imagegen API.

Depends on httpx, httpx-sse and tqdm only; never imports the server packages (`app`, `worker`).
"""

from imagegen_client.client import (
    DEFAULT_URL,
    AsyncClient,
    Client,
    ImagegenError,
    ImageRef,
    Job,
    JobErrorInfo,
    JobEvent,
    Progress,
    WaitTimeout,
)

__all__ = [
    "DEFAULT_URL",
    "AsyncClient",
    "Client",
    "ImageRef",
    "ImagegenError",
    "Job",
    "JobErrorInfo",
    "JobEvent",
    "Progress",
    "WaitTimeout",
]
