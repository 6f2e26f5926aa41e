"""GET / (the browser page) and GET /web/{asset}: static files from `app/web/`, no build step.

Only a fixed set of file names is served, so no request path ever reaches the file system.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import FileResponse

from app.core.errors import NotFoundError

WEB_DIR = Path(__file__).resolve().parent.parent.parent / "web"
ASSETS = {"app.js": "text/javascript", "style.css": "text/css", "favicon.svg": "image/svg+xml"}
# The page is tiny; revalidating on every load keeps a deployed change from hiding behind a cache.
NO_CACHE = {"Cache-Control": "no-cache", "X-Content-Type-Options": "nosniff"}
# The page loads only its own files and talks only to this server (images by paths relative to the
# page, signed when keys are on); it may not be framed by other sites (clickjacking) nor leak its
# URL onwards.
PAGE = NO_CACHE | {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
}

router = APIRouter(include_in_schema=False)


@router.get("/", name="web_index")
def index() -> FileResponse:
    return FileResponse(WEB_DIR / "index.html", media_type="text/html", headers=PAGE)


@router.get("/web/{name}", name="web_asset")
def asset(name: str) -> FileResponse:
    media_type = ASSETS.get(name)
    if media_type is None:
        raise NotFoundError(f"no asset {name!r}")
    return FileResponse(WEB_DIR / name, media_type=media_type, headers=NO_CACHE)
