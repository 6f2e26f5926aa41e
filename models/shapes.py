"""Synthetic "coloured shape on a coloured background" data and a procedural prompt checker.

Images are 32×32 RGB with one filled shape (circle, square, triangle) in one of the 8 corners of
the RGB cube on a background of another of them; size and position are random. Some
(colour, shape, background) combinations are held out of training to measure generalisation.
The checker reads an image back into (foreground colour, background colour, shape) with plain
geometry, so the same code scores ground truth and generated samples.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

SIZE = 32
# The 8 corners of the RGB cube: as far apart as colours can be, so nearest-colour decoding is
# unambiguous even for slightly-off generated pixels. All but "green" (`g re e n</w>`) are single
# tokens in the tokenizer; of the template words "background" and "image" split too (see
# models.tokenizer). Captions are 12-20 tokens with BOS/EOS.
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (255, 0, 0),
    "green": (0, 255, 0),
    "blue": (0, 0, 255),
    "yellow": (255, 255, 0),
    "magenta": (255, 0, 255),
    "cyan": (0, 255, 255),
    "white": (255, 255, 255),
    "black": (0, 0, 0),
}
COLOURS: tuple[str, ...] = tuple(PALETTE)
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
TEMPLATES: tuple[str, ...] = (
    "a {fg} {shape} on a {bg} background",
    "{bg} background with a {fg} {shape}",
    "an image of a {fg} {shape} on {bg}",
    "a picture of a {fg} {shape} over a {bg} background",
)
_PALETTE_ARR = np.array([PALETTE[c] for c in COLOURS], dtype=np.float32)


@dataclass(frozen=True)
class Combo:
    """One (foreground colour, shape, background colour) triple."""

    fg: str
    shape: str
    bg: str

    def caption(self, template: int = 0) -> str:
        return TEMPLATES[template].format(fg=self.fg, shape=self.shape, bg=self.bg)


def all_combos() -> list[Combo]:
    """Every triple with different foreground and background colours (8·7·3 = 168)."""
    return [Combo(f, s, b) for f in COLOURS for b in COLOURS if f != b for s in SHAPES]


def is_held_out(combo: Combo) -> bool:
    """Fixed rule that holds out ~1/7 of the triples.

    For a given (fg, bg) pair the three shape indices are consecutive, so at most one of them can
    hit 0 mod 7: every colour pair is still seen in training with at least two shapes, and every
    colour is seen with every shape, which is what makes the held-out triples learnable at all.
    """
    fi, bi, si = COLOURS.index(combo.fg), COLOURS.index(combo.bg), SHAPES.index(combo.shape)
    return (3 * fi + 5 * bi + si) % 7 == 0


def train_combos() -> list[Combo]:
    return [c for c in all_combos() if not is_held_out(c)]


def held_out_combos() -> list[Combo]:
    return [c for c in all_combos() if is_held_out(c)]


def render(combo: Combo, rng: np.random.Generator) -> np.ndarray:
    """Draw one uint8 HxWx3 image with a random size and position (shape stays 2 px off the edge)."""
    yy, xx = np.mgrid[0:SIZE, 0:SIZE].astype(np.float32) + 0.5  # pixel centres
    img = np.empty((SIZE, SIZE, 3), dtype=np.uint8)
    img[:] = PALETTE[combo.bg]
    size = int(rng.integers(10, 23))  # bounding box side in pixels
    x0 = int(rng.integers(2, SIZE - 2 - size + 1))
    y0 = int(rng.integers(2, SIZE - 2 - size + 1))
    x1, y1 = x0 + size, y0 + size
    if combo.shape == "square":
        mask = (xx >= x0) & (xx < x1) & (yy >= y0) & (yy < y1)
    elif combo.shape == "circle":
        r = size / 2
        mask = (xx - (x0 + r)) ** 2 + (yy - (y0 + r)) ** 2 <= r * r
    elif combo.shape == "triangle":
        # Apex up, base on the bottom edge of the box: half-width grows linearly with depth.
        frac = (yy - y0) / size
        mask = (yy >= y0) & (yy < y1) & (np.abs(xx - (x0 + size / 2)) <= frac * size / 2)
    else:
        raise ValueError(combo.shape)
    img[mask] = PALETTE[combo.fg]
    return img


def sample_batch(
    n: int, rng: np.random.Generator, combos: list[Combo] | None = None, random_template: bool = True
) -> tuple[np.ndarray, list[Combo], list[int]]:
    """n images (uint8, N×H×W×3) of combos drawn uniformly from `combos` (default: training set)."""
    pool = train_combos() if combos is None else combos
    picks = rng.integers(0, len(pool), size=n)
    temps = rng.integers(0, len(TEMPLATES), size=n) if random_template else np.zeros(n, dtype=int)
    chosen = [pool[i] for i in picks]
    imgs = np.stack([render(c, rng) for c in chosen])
    return imgs, chosen, [int(t) for t in temps]


# ----------------------------------------------------------------------------------------------
# Checker


@dataclass(frozen=True)
class Reading:
    """What the checker sees in one image (None when it cannot find a foreground)."""

    fg: str | None
    bg: str
    shape: str | None


def nearest_colour(pixels: np.ndarray) -> np.ndarray:
    """Index into COLOURS of the nearest palette colour for each pixel (…×3 uint8/float)."""
    d = ((pixels[..., None, :].astype(np.float32) - _PALETTE_ARR) ** 2).sum(-1)
    return d.argmin(-1)


def _classify_shape(mask: np.ndarray) -> str | None:
    """Circle / square / triangle from the mask's bounding box.

    A filled box covers ~100% of its bounding box, a disc ~79%, an apex-up triangle ~50% with
    ~3/4 of its pixels in the lower half. Corner occupancy separates a rounded square from a disc.
    """
    ys, xs = np.nonzero(mask)
    if len(ys) < 6:
        return None
    y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
    box = mask[y0:y1, x0:x1].astype(np.float32)
    h, w = box.shape
    fill = box.mean()
    lower = box[h // 2 :].sum() / max(box.sum(), 1.0)
    if h % 2:  # odd height: the middle row sits in both halves, so split it evenly
        lower -= 0.5 * box[h // 2].sum() / max(box.sum(), 1.0)
    # Mean occupancy of the four corner cells (a quarter of each side).
    ch, cw = max(1, h // 4), max(1, w // 4)
    top_corners = (box[:ch, :cw].mean() + box[:ch, -cw:].mean()) / 2
    bottom_corners = (box[-ch:, :cw].mean() + box[-ch:, -cw:].mean()) / 2
    if lower > 0.62 and top_corners < 0.3:
        return "triangle"
    if fill > 0.88 or min(top_corners, bottom_corners) > 0.75:
        return "square"
    return "circle"


def check(img: np.ndarray) -> Reading:
    """Read (fg colour, bg colour, shape) from an H×W×3 uint8 image."""
    labels = nearest_colour(img)
    border = np.concatenate([labels[:2].ravel(), labels[-2:].ravel(), labels[:, :2].ravel(), labels[:, -2:].ravel()])
    bg = int(np.bincount(border, minlength=len(COLOURS)).argmax())
    counts = np.bincount(labels[labels != bg].ravel(), minlength=len(COLOURS))
    if counts.sum() < 6:
        return Reading(None, COLOURS[bg], None)
    fg = int(counts.argmax())
    mask = labels == fg
    # Keep the largest 4-connected blob so stray specks don't stretch the bounding box.
    mask = _largest_component(mask)
    return Reading(COLOURS[fg], COLOURS[bg], _classify_shape(mask))


def _largest_component(mask: np.ndarray) -> np.ndarray:
    """Largest 4-connected component of a boolean mask (tiny images: plain flood fill)."""
    seen = np.zeros_like(mask, dtype=bool)
    best: list[tuple[int, int]] = []
    h, w = mask.shape
    for sy, sx in zip(*np.nonzero(mask), strict=False):
        if seen[sy, sx]:
            continue
        stack, comp = [(sy, sx)], []
        seen[sy, sx] = True
        while stack:
            y, x = stack.pop()
            comp.append((y, x))
            for ny, nx in ((y + 1, x), (y - 1, x), (y, x + 1), (y, x - 1)):
                if 0 <= ny < h and 0 <= nx < w and mask[ny, nx] and not seen[ny, nx]:
                    seen[ny, nx] = True
                    stack.append((ny, nx))
        if len(comp) > len(best):
            best = comp
    out = np.zeros_like(mask, dtype=bool)
    if best:
        yy, xx = zip(*best, strict=False)
        out[list(yy), list(xx)] = True
    return out


def score(readings: list[Reading], combos: list[Combo]) -> dict[str, float]:
    """Fraction of images whose fg colour / bg colour / shape / all three match the combo."""
    n = max(len(combos), 1)
    fg = sum(r.fg == c.fg for r, c in zip(readings, combos, strict=False)) / n
    bg = sum(r.bg == c.bg for r, c in zip(readings, combos, strict=False)) / n
    shape = sum(r.shape == c.shape for r, c in zip(readings, combos, strict=False)) / n
    allk = sum(r.fg == c.fg and r.bg == c.bg and r.shape == c.shape for r, c in zip(readings, combos, strict=False)) / n
    return {"fg": fg, "bg": bg, "shape": shape, "all": allk}
