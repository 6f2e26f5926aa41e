"""imagegen: an HTTP text-to-image service (FastAPI front end, Redis/RQ queue, diffusers workers)."""

__version__ = "0.1.0"
