"""Validation of uploaded images: only PNG, JPEG or WebP, bounded in bytes and pixels, decoded
completely by Pillow and re-encoded as a plain RGB PNG, so nothing the client sent reaches the
worker unchecked (no metadata, no animation, no decompression bombs, no truncated data).
"""

from __future__ import annotations

import io
import threading
import warnings
from typing import Any

from PIL import ExifTags, Image, ImageChops, ImageOps, UnidentifiedImageError

MAX_INPUT_BYTES = 4 * 1024 * 1024
MAX_INPUT_SIDE = 4096
FORMATS = {"PNG": "image/png", "JPEG": "image/jpeg", "WEBP": "image/webp"}
# Decodes at once per process: a small file can hold many pixels, so concurrent uploads must not
# multiply what one costs. At 4096² pixels (shrunk to fit 1024) a PNG of a few KB costs 25-80 MiB
# (its decoded pixels: 1 byte each for palette or grey, 2 for 16-bit grey, 4 for RGB(A) or grey
# with alpha, then a strip at a time), a JPEG about 10 (decoded at a reduced scale; ~50 if
# progressive), and a WebP of under 1 KB ~260 MiB (Pillow's decoder holds the whole canvas
# several times over, and cannot decode at a reduced scale).
DECODING_AT_ONCE = 2
_DECODING = threading.BoundedSemaphore(DECODING_AT_ONCE)
STRIP_PIXELS = 1 << 18  # converted at a time, while shrinking (see `_shrunk`)
# Declared types that say nothing about the format; the bytes decide.
GENERIC_TYPES = {"", "application/octet-stream"}


class InputImageError(ValueError):
    """The upload is refused; `status` is the HTTP status to answer (413, 415 or 422)."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message


def _base_type(content_type: str | None) -> str:
    return (content_type or "").split(";")[0].strip().lower()


def normalize_image(
    data: bytes,
    content_type: str | None = None,
    *,
    max_bytes: int = MAX_INPUT_BYTES,
    max_side: int = MAX_INPUT_SIDE,
    fit: int | None = None,
) -> bytes:
    """Check an uploaded image and return it as an RGB PNG, shrunk to fit `fit`×`fit` if given.

    Raises InputImageError for anything else: empty or over `max_bytes` (413), not PNG/JPEG/WebP
    or a declared type that contradicts the bytes (415), larger than `max_side` on a side, a
    decompression bomb, or truncated/corrupt data (422).
    """
    if not data:
        raise InputImageError(422, "invalid_image", "image: the file is empty")
    if len(data) > max_bytes:
        # Uploads are read up to max_bytes + 1 bytes: the length here is not the file's size.
        raise InputImageError(413, "payload_too_large", f"image: over {max_bytes} bytes (the most allowed)")
    declared = _base_type(content_type)
    if declared not in GENERIC_TYPES and declared not in FORMATS.values():
        raise InputImageError(415, "unsupported_media_type", f"image: type {declared!r} is not PNG, JPEG or WebP")
    with _DECODING:
        return _normalize(data, declared, max_side, fit)


def _normalize(data: bytes, declared: str, max_side: int, fit: int | None) -> bytes:
    with warnings.catch_warnings():
        # Pillow only warns between its pixel limit and twice it; treat that as the bomb it may be.
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            image: Image.Image = Image.open(io.BytesIO(data), formats=list(FORMATS))
        except UnidentifiedImageError:
            if _signed_as_ours(data):  # a PNG whose header chunk fails its CRC, say: broken, not foreign
                raise InputImageError(422, "invalid_image", "image: truncated or corrupt (unreadable header)") from None
            raise InputImageError(415, "unsupported_media_type", "image: not a PNG, JPEG or WebP file") from None
        except (Image.DecompressionBombError, Image.DecompressionBombWarning):
            raise InputImageError(422, "invalid_image", "image: too many pixels (decompression bomb)") from None
        except Exception as exc:  # a header Pillow cannot parse
            raise InputImageError(422, "invalid_image", f"image: unreadable ({type(exc).__name__})") from None
        fmt = image.format or ""
        if declared not in GENERIC_TYPES and FORMATS.get(fmt) != declared:
            raise InputImageError(
                415, "unsupported_media_type", f"image: declared {declared} but the file is {fmt or 'unknown'}"
            )
        width, height = image.size
        # Checked from the header, before a single pixel is decoded.
        if width < 1 or height < 1 or width > max_side or height > max_side:
            raise InputImageError(
                422, "invalid_image", f"image: {width}x{height} pixels; at most {max_side}x{max_side} allowed"
            )
        try:
            image.seek(0)  # the first frame of an animation
            if fit is not None and fmt == "JPEG":
                image.draft("RGB", (fit, fit))  # JPEG decodes at 1/2, 1/4 or 1/8 scale, still ≥ `fit`
            image.load()  # decodes everything: truncated or corrupt data fails here
            # Read once decoded (a PNG's eXIf chunk may follow its pixels); applied to the small
            # result below: applied here, a full-size copy of the image came first even without it.
            orientation = image.getexif().get(ExifTags.Base.Orientation, 1)
            rgb = _to_rgb(image, fit)
            del image  # the decoded pixels: the rest works on the shrunk copy
            if fit is not None and max(rgb.size) > fit:
                rgb.thumbnail((fit, fit), Image.Resampling.LANCZOS)  # the models never use more pixels than this
            rgb = _oriented(rgb, orientation)
        except (Image.DecompressionBombError, Image.DecompressionBombWarning):
            raise InputImageError(422, "invalid_image", "image: too many pixels (decompression bomb)") from None
        except Exception as exc:
            raise InputImageError(422, "invalid_image", f"image: truncated or corrupt ({type(exc).__name__})") from None
    out = io.BytesIO()
    rgb.save(out, format="PNG")
    return out.getvalue()


def _signed_as_ours(data: bytes) -> bool:
    """Whether the bytes start with the signature of a format we take (PNG, JPEG, WebP)."""
    return data.startswith((b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff")) or (data[:4] == b"RIFF" and data[8:12] == b"WEBP")


def _grey16(image: Image.Image) -> Image.Image:
    """16-bit grey as 8-bit ("L"), or with its transparent value (PNG's tRNS) as alpha ("LA"):
    its transparent pixels came out black instead of white."""
    grey = image.point(lambda v: v / 256).convert("L")
    key = image.info.get("transparency")
    if not isinstance(key, int):
        return grey
    # Alpha 0 exactly where the value is the key: |v - key| scaled up, clipped to 0..255 as 8-bit.
    wide = image.convert("I")
    above = wide.point(lambda v: (v - key) * 255).convert("L")
    below = wide.point(lambda v: (key - v) * 255).convert("L")
    return Image.merge("LA", (grey, ImageChops.lighter(above, below)))


def _oriented(image: Image.Image, orientation: Any) -> Image.Image:
    """`image` turned as an EXIF orientation tag (of the decoded file) says (Pillow's `exif_transpose`)."""
    if orientation == 1:
        return image
    image.getexif()[ExifTags.Base.Orientation] = orientation  # the copy has no EXIF of its own
    return ImageOps.exif_transpose(image) or image


def _to_rgb(image: Image.Image, fit: int | None = None) -> Image.Image:
    """RGB pixels; transparent areas become white rather than whatever colour they hide. An image
    of more than twice `fit` on a side is first shrunk by a whole factor (box averaging), so the
    copies below hold a fraction of its pixels: a 2 KB palette PNG of 4096² pixels otherwise took
    about 200 MiB of the API's memory."""
    factor = max(1, max(image.size) // fit) if fit is not None else 1  # still ≥ `fit`: thumbnail() ends it
    image = _shrunk(image, factor)
    if image.mode in ("RGBA", "LA", "PA"):
        rgba = image if image.mode == "RGBA" else image.convert("RGBA")
        background = Image.new("RGB", rgba.size, (255, 255, 255))
        background.paste(rgba, mask=rgba.getchannel("A"))
        return background
    return image.convert("RGB")


def _needs_flattening(image: Image.Image) -> bool:
    """Whether `_flat` converts the image (its mode is one `reduce` does not take, or it has a
    transparent colour)."""
    return image.mode in ("P", "1") or image.mode.startswith("I;16") or "transparency" in image.info


def _flat(image: Image.Image) -> Image.Image:
    """The image in a mode `reduce` takes, its transparency (a palette's, or one colour marked
    transparent: PNG's tRNS) as an alpha channel."""
    if image.mode == "P" or (image.mode in ("1", "L", "RGB") and "transparency" in image.info):
        return image.convert("RGBA")
    if image.mode == "1":
        return image.convert("L")
    if image.mode.startswith("I;16"):
        return _grey16(image)  # 16-bit grey has no direct RGB conversion
    return image


def _shrunk(image: Image.Image, factor: int) -> Image.Image:
    """`_flat(image).reduce(factor)` (not reduced for a factor of 1), a strip at a time: whole, the
    converted copy is up to four times the decoded image (16-bit grey with a transparent value
    took several: +240 MiB at 4096²), and `reduce` copies RGBA or grey with alpha whole first (its
    premultiplied alpha: +64 MiB at 4096²)."""
    if factor < 2 and not _needs_flattening(image):
        return image
    width, height = image.size
    # Strips of about STRIP_PIXELS pixels (~1 MiB as RGBA), a whole number of boxes high: the boxes
    # never straddle two strips. Larger ones stayed in the allocator's per-thread pools: eight
    # uploads on eight threads (two decoding at a time) kept ~270 MiB with strips of 8 MiB.
    rows = factor * max(1, STRIP_PIXELS // (width * factor))
    out: Image.Image | None = None
    for top in range(0, height, rows):
        strip = _flat(image.crop((0, top, width, min(height, top + rows))))  # the crop keeps `info`
        if factor >= 2:
            strip = strip.reduce(factor)
        if out is None:
            out = Image.new(strip.mode, (-(-width // factor), -(-height // factor)))
        out.paste(strip, (0, top // factor))
    assert out is not None  # an image has at least one row
    return out
