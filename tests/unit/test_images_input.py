"""Validation of uploaded images (app.core.images): what passes is re-encoded as a plain RGB PNG,
everything else is a clear 4xx (size, type, pixels, bombs, truncation), never an exception leak."""

from __future__ import annotations

import io
import struct
import zlib

import pytest
from PIL import Image, PngImagePlugin

from app.core.images import InputImageError, normalize_image


def encode(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **kwargs)
    return buf.getvalue()


def decode(data: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    image.load()
    return image


def refused(data: bytes, content_type: str | None = None, **kwargs) -> InputImageError:
    with pytest.raises(InputImageError) as info:
        normalize_image(data, content_type, **kwargs)
    return info.value


def png_with_size(width: int, height: int) -> bytes:
    """A 1x1 PNG whose header claims width x height (what a decompression bomb looks like up front)."""
    data = bytearray(encode(Image.new("RGB", (1, 1)), "PNG"))
    ihdr = 8 + 8  # signature, then length + type of the first chunk
    data[ihdr : ihdr + 8] = struct.pack(">II", width, height)
    crc = zlib.crc32(bytes(data[ihdr - 4 : ihdr + 13]))
    data[ihdr + 13 : ihdr + 17] = struct.pack(">I", crc)
    return bytes(data)


@pytest.mark.parametrize(("fmt", "ctype"), [("PNG", "image/png"), ("JPEG", "image/jpeg"), ("WEBP", "image/webp")])
def test_accepted_formats_become_rgb_png(fmt: str, ctype: str) -> None:
    source = Image.new("RGB", (40, 30), (200, 40, 20))
    for declared in (ctype, None, "application/octet-stream", f"{ctype}; charset=binary"):
        out = decode(normalize_image(encode(source, fmt), declared))
        assert (out.format, out.mode, out.size) == ("PNG", "RGB", (40, 30))
        assert abs(out.getpixel((5, 5))[0] - 200) <= 8  # lossy formats stay close


def test_metadata_is_dropped_and_transparency_becomes_white() -> None:
    info = PngImagePlugin.PngInfo()
    info.add_text("secret", "x" * 100)
    source = Image.new("RGBA", (8, 8), (255, 0, 0, 0))
    out = decode(normalize_image(encode(source, "PNG", pnginfo=info)))
    assert "secret" not in out.info and out.getpixel((0, 0)) == (255, 255, 255)


@pytest.mark.parametrize(("mode", "key"), [("RGB", (0, 0, 255)), ("L", 29), ("I;16", 300)])
def test_a_colour_marked_transparent_becomes_white(mode: str, key: object) -> None:
    # PNG's tRNS chunk on RGB or grey images: one colour is transparent (it kept its colour before;
    # 16-bit grey came out black).
    source = Image.new(mode, (6, 6), key)  # type: ignore[arg-type]
    source.putpixel((0, 0), {"RGB": (200, 40, 20), "L": 200, "I;16": 200 * 256}[mode])
    source.putpixel((0, 1), {"RGB": (0, 0, 254), "L": 28, "I;16": 301}[mode])  # next to the key: opaque
    out = decode(normalize_image(encode(source, "PNG", transparency=key)))
    assert out.getpixel((3, 3)) == (255, 255, 255)
    assert out.getpixel((0, 0)) == ((200, 40, 20) if mode == "RGB" else (200, 200, 200))
    assert out.getpixel((0, 1)) != (255, 255, 255)


def test_palette_grey_and_16_bit_inputs_are_converted() -> None:
    for image in (Image.new("P", (4, 4)), Image.new("L", (4, 4), 9), Image.new("I;16", (4, 4), 4000)):
        out = decode(normalize_image(encode(image, "PNG")))
        assert out.mode == "RGB" and out.size == (4, 4)


def test_fit_shrinks_large_images_keeping_the_aspect() -> None:
    out = decode(normalize_image(encode(Image.new("RGB", (400, 200)), "PNG"), fit=100))
    assert out.size == (100, 50)


def test_empty_and_oversized_files() -> None:
    assert refused(b"").status == 422
    err = refused(encode(Image.effect_noise((64, 64), 50), "PNG"), max_bytes=1000)
    assert (err.status, err.code) == (413, "payload_too_large")
    # Uploads are read up to the limit + 1 byte, so the message names the limit, not a size it never saw.
    assert err.message == "image: over 1000 bytes (the most allowed)"


@pytest.mark.parametrize("ctype", ["text/plain", "image/gif", "application/json", "image/svg+xml"])
def test_wrong_declared_type_is_415(ctype: str) -> None:
    err = refused(encode(Image.new("RGB", (4, 4)), "PNG"), ctype)
    assert (err.status, err.code) == (415, "unsupported_media_type")


def test_declared_type_must_match_the_bytes() -> None:
    err = refused(encode(Image.new("RGB", (4, 4)), "JPEG"), "image/png")
    assert err.status == 415 and "JPEG" in err.message


@pytest.mark.parametrize(
    "data",
    [b"hello, not an image", b"<svg xmlns='http://www.w3.org/2000/svg'/>", encode(Image.new("RGB", (4, 4)), "GIF")],
)
def test_other_content_is_415(data: bytes) -> None:
    assert refused(data).status == 415


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP"])
def test_truncated_files_are_422(fmt: str) -> None:
    noisy = Image.effect_noise((256, 256), 60).convert("RGB")
    data = encode(noisy, fmt)
    err = refused(data[: len(data) // 2])
    assert err.status == 422 and err.code == "invalid_image"


def test_huge_dimensions_are_refused_before_decoding() -> None:
    err = refused(png_with_size(5000, 10))
    assert err.status == 422 and "5000x10" in err.message
    assert refused(encode(Image.new("L", (64, 8)), "PNG"), max_side=32).status == 422


@pytest.mark.parametrize("size", [(100_000, 100_000), (10_000, 10_000)])
def test_decompression_bombs_are_422(size: tuple[int, int]) -> None:
    # Over twice Pillow's pixel limit it raises, between once and twice it warns: both are refused,
    # even when the side limit would let them through.
    err = refused(png_with_size(*size), max_side=200_000)
    assert err.status == 422 and "bomb" in err.message


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP"])
def test_a_broken_header_of_a_format_we_take_is_422_not_415(fmt: str) -> None:
    """Pillow cannot identify a PNG whose header chunk fails its CRC (nor a JPEG or WebP cut
    right after its signature), so it was answered as another format: 415."""
    data = bytearray(encode(Image.new("RGB", (8, 8)), fmt))
    if fmt == "PNG":
        data[20] ^= 0xFF  # in IHDR: its CRC no longer matches
        broken = bytes(data)
    else:
        broken = bytes(data[:14])
    err = refused(broken)
    assert err.status == 422 and err.code == "invalid_image", err.message


def test_corrupt_data_after_a_valid_header_is_422() -> None:
    data = bytearray(encode(Image.effect_noise((64, 64), 50).convert("RGB"), "PNG"))
    data[60:80] = b"\x00" * 20  # inside the compressed pixel data
    assert refused(bytes(data)).status == 422


# The peak resident memory of the process's own address space, in KiB. Not `ru_maxrss`: Linux
# carries it over from the parent (the pytest process, its size depending on the tests before)
# into the child it starts, so a child's growth past it read as less than it was, often zero.
PEAK = """
def peak():
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmHWM:"))
"""

MEMORY_CHECK = (
    PEAK
    + """
import io, json
from concurrent.futures import ThreadPoolExecutor
from PIL import Image
from app.core.images import normalize_image

tiny = Image.new("P", (4096, 4096))
tiny.putpalette([0, 0, 0, 255, 0, 0] * 128)
tiny.paste(1, (0, 0, 2048, 4096))  # left half red
buffer = io.BytesIO()
tiny.save(buffer, "PNG", optimize=True)
data = buffer.getvalue()
before = peak()
with ThreadPoolExecutor(8) as pool:
    outs = list(pool.map(lambda _: normalize_image(data, fit=512), range(8)))
out = Image.open(io.BytesIO(outs[0]))
grown = (peak() - before) // 1024
print(json.dumps([len(data), grown, out.size, out.getpixel((10, 10)), out.getpixel((500, 10))]))
"""
)


def test_small_files_with_many_pixels_decode_in_bounded_memory() -> None:
    """A ~20 KB palette PNG of 4096² pixels, 8 uploads at once (the API decodes in a thread pool):
    each took ~200 MiB, all together 1.6 GiB. Now at most two decode at once, shrunk before the
    colour conversions."""
    import json
    import subprocess
    import sys

    from tests.procs import ROOT

    done = subprocess.run([sys.executable, "-c", MEMORY_CHECK], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    size, grown, shape, left, right = json.loads(done.stdout)
    assert size < 64_000 and grown < 300, done.stdout  # bytes in; MiB of peak memory growth
    assert shape == [512, 512] and left == [255, 0, 0] and right == [0, 0, 0]


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP"])
@pytest.mark.parametrize("fit", [None, 100, 20])
def test_the_exif_orientation_is_applied(fmt: str, fit: int | None) -> None:
    """Stored sideways (orientation 6: turn 90° clockwise to show), the left half red: shown, the
    top half is red; also once shrunk (applied to the shrunk image, not to a full-size copy)."""
    source = Image.new("RGB", (400, 200), (0, 0, 255))
    source.paste((255, 0, 0), (0, 0, 200, 200))
    exif = Image.Exif()
    exif[0x0112] = 6
    out = decode(normalize_image(encode(source, fmt, exif=exif.tobytes()), fit=fit))
    width, height = out.size
    assert (width, height) == {None: (200, 400), 100: (50, 100), 20: (10, 20)}[fit]
    top, bottom = out.getpixel((width // 2, height // 4)), out.getpixel((width // 2, height * 3 // 4))
    assert isinstance(top, tuple) and isinstance(bottom, tuple)
    assert top[0] > 200 and top[2] < 50 and bottom[0] < 50 and bottom[2] > 200, (top, bottom)


DECODE_PEAK = (
    PEAK
    + """
import io, json, sys
from PIL import Image
from app.core.images import normalize_image

data = sys.stdin.buffer.read()  # made by the test: this process never held the whole image before
before = peak()
out = Image.open(io.BytesIO(normalize_image(data, fit=1024)))
grown = (peak() - before) // 1024
print(json.dumps([grown, out.size]))
"""
)


@pytest.mark.parametrize(
    ("mode", "key", "decoded"),
    [("RGBA", None, 64), ("LA", None, 64), ("I;16", None, 32), ("I;16", 1000, 32)],
    ids=["RGBA", "LA", "16-bit grey", "16-bit grey with a transparent value"],
)
def test_decoding_costs_little_beyond_the_decoded_pixels(mode: str, key: int | None, decoded: int) -> None:
    """A small PNG of 4096² pixels, shrunk to fit 1024: its decoded pixels (`decoded` MiB) and
    strips of them, no whole copies (RGBA took +134 MiB, 16-bit grey with tRNS +242 MiB)."""
    import json
    import subprocess
    import sys

    from tests.procs import ROOT

    colour: dict[str, int | tuple[int, ...]] = {"RGBA": (10, 20, 30, 100), "I;16": 1000, "LA": (3, 100)}
    data = encode(
        Image.new(mode, (4096, 4096), colour[mode]), "PNG", **({"transparency": key} if key is not None else {})
    )
    assert len(data) < 100_000
    args = [sys.executable, "-c", DECODE_PEAK]
    done = subprocess.run(args, cwd=ROOT, input=data, capture_output=True, timeout=120)
    assert done.returncode == 0, done.stderr.decode()
    grown, shape = json.loads(done.stdout)
    assert shape == [1024, 1024]
    assert grown < decoded + 32, grown  # MiB of peak memory growth
