"""Printed glyphs rendered from matplotlib's bundled TrueType fonts, in the look of scikit-learn's digits.

The demo's pretraining source: synthetic-to-real transfer, printed characters -> handwritten
digits. Each sample is one character drawn with one of :data:`FONTS` (22 faces shipped in
``matplotlib/mpl-data/fonts/ttf``: DejaVu Sans/Serif/Mono, STIX General, Computer Modern, in
regular, bold, italic and oblique cuts; fonts whose digits are symbols or blank are left out),
then made to look handwritten and scanned the way the target was:

1. pen: a random stroke width (Pillow's ``stroke_width``, 0-3 px at a 44 px font size on a 64 px
   canvas), a random affine map (rotation, shear, horizontal squeeze) and a smooth random
   displacement field ("elastic distortion", Simard, Steinkraus & Platt, ICDAR 2003: Gaussian-
   smoothed uniform displacements, ``scipy.ndimage``);
2. scan: the preprocessing of the UCI "optdigits" set that ``sklearn.datasets.load_digits`` ships
   (Alpaydin & Kaynak, 1998): a binary 32x32 bitmap with the character scaled to the full height,
   centred, then the count of ink pixels in each non-overlapping 4x4 block, an 8x8 image of
   integers 0-16. Pixel flips add scanner noise.

The result is returned as that 8x8 array of 0-16 counts, the same form as ``load_digits().images``,
so that :mod:`tldist.data.demo` turns source and target into 32 px images by one code path.
Everything is drawn from a ``numpy`` Generator the caller seeds: no global random state.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import numpy as np

FONTS = ("DejaVuSans.ttf", "DejaVuSans-Bold.ttf", "DejaVuSans-Oblique.ttf", "DejaVuSans-BoldOblique.ttf",
         "DejaVuSansMono.ttf", "DejaVuSansMono-Bold.ttf", "DejaVuSansMono-Oblique.ttf",
         "DejaVuSansMono-BoldOblique.ttf", "DejaVuSerif.ttf", "DejaVuSerif-Bold.ttf", "DejaVuSerif-Italic.ttf",
         "DejaVuSerif-BoldItalic.ttf", "STIXGeneral.ttf", "STIXGeneralBol.ttf", "STIXGeneralItalic.ttf",
         "STIXGeneralBolIta.ttf", "cmr10.ttf", "cmb10.ttf", "cmss10.ttf", "cmtt10.ttf", "cmti10.ttf", "cmmi10.ttf")
"""Font files (under ``matplotlib.get_data_path()/fonts/ttf``) whose digits and Latin letters are real
glyphs; ``cmmi10`` has old-style (hanging) figures."""
CANVAS = 64
"""Side of the square canvas a glyph is drawn and distorted on (px)."""
FONT_SIZE = 44
BITMAP = 32
"""Side of the binary bitmap, as in optdigits (px); :data:`BLOCK`-px blocks give the 8x8 counts."""
BLOCK = 4


def font_path(name: str) -> Path:
    """The path of one of :data:`FONTS` inside the installed matplotlib."""
    import matplotlib

    return Path(matplotlib.get_data_path()) / "fonts" / "ttf" / name


@lru_cache(maxsize=None)
def _font(name: str):
    from PIL import ImageFont

    return ImageFont.truetype(str(font_path(name)), FONT_SIZE)


@lru_cache(maxsize=4096)
def glyph(char: str, font: str, stroke: int) -> np.ndarray:
    """``char`` drawn white (255) on black in ``font``, centred on a CANVAS x CANVAS uint8 array (cached)."""
    from PIL import Image, ImageDraw

    f = _font(font)
    img = Image.new("L", (CANVAS, CANVAS), 0)
    draw = ImageDraw.Draw(img)
    x0, y0, x1, y1 = draw.textbbox((0, 0), char, font=f, stroke_width=stroke)
    pos = ((CANVAS - (x1 - x0)) / 2 - x0, (CANVAS - (y1 - y0)) / 2 - y0)
    draw.text(pos, char, fill=255, font=f, stroke_width=stroke, stroke_fill=255)
    return np.asarray(img)


def _elastic(img: np.ndarray, rng: np.random.Generator, alpha: float, sigma: float) -> np.ndarray:
    """Warp ``img`` by a random displacement field: uniform(-1, 1) per pixel, Gaussian-smoothed
    with ``sigma`` px, scaled to ``alpha`` px of peak displacement (Simard et al., 2003)."""
    from scipy.ndimage import gaussian_filter, map_coordinates

    h, w = img.shape
    field = [gaussian_filter(rng.uniform(-1, 1, (h, w)), sigma, mode="constant") for _ in range(2)]
    peak = max(float(np.abs(field[0]).max()), float(np.abs(field[1]).max()), 1e-6)
    yy, xx = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    coords = [yy + field[0] * (alpha / peak), xx + field[1] * (alpha / peak)]
    return map_coordinates(img.astype(np.float32), coords, order=1, mode="constant")


def _affine(img: np.ndarray, theta: float, shear: float, squeeze: float) -> np.ndarray:
    """Rotate by ``theta`` rad, shear x by ``shear`` * y, scale x by ``squeeze`` about the centre."""
    from PIL import Image

    c, s = np.cos(theta), np.sin(theta)
    fwd = np.array([[c, -s], [s, c]]) @ np.array([[1.0, shear], [0.0, 1.0]]) @ np.diag([squeeze, 1.0])
    inv = np.linalg.inv(fwd)
    centre = np.array([CANVAS / 2, CANVAS / 2])
    off = centre - inv @ centre
    out = Image.fromarray(img).transform((CANVAS, CANVAS), Image.Transform.AFFINE,
                                         (inv[0, 0], inv[0, 1], off[0], inv[1, 0], inv[1, 1], off[1]),
                                         resample=Image.Resampling.BILINEAR)
    return np.asarray(out, dtype=np.float32)


def scan(ink: np.ndarray, rng: np.random.Generator, *, flip: float = 0.0, height: float = 1.0) -> np.ndarray:
    """optdigits-style digitisation of a gray ``ink`` image (any size, ink > 127 is ink).

    The ink's bounding box is scaled (aspect kept, at most as wide as tall) so its height is
    ``height`` x 32 px, centred in a 32x32 binary bitmap; a fraction ``flip`` of the pixels next
    to a stroke edge is flipped; returns the 8x8 float32 array of ink counts per 4x4 block (0-16).
    """
    from PIL import Image

    on = ink > 127
    rows, cols = np.flatnonzero(on.any(1)), np.flatnonzero(on.any(0))
    if rows.size == 0:
        return np.zeros((BITMAP // BLOCK,) * 2, np.float32)
    crop = ink[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1]
    h, w = crop.shape
    scale = height * BITMAP / h
    nh, nw = max(1, round(h * scale)), max(1, min(BITMAP, round(w * scale)))
    small = np.asarray(Image.fromarray(crop.astype(np.uint8)).resize((nw, nh), Image.Resampling.BILINEAR)) > 127
    bitmap = np.zeros((BITMAP, BITMAP), bool)
    y0, x0 = (BITMAP - nh) // 2, (BITMAP - nw) // 2
    bitmap[y0:y0 + nh, x0:x0 + nw] = small
    if flip > 0:
        edge = bitmap ^ np.roll(bitmap, 1, 0) | bitmap ^ np.roll(bitmap, 1, 1)
        bitmap ^= edge & (rng.random(bitmap.shape) < flip)
    return bitmap.reshape(BITMAP // BLOCK, BLOCK, BITMAP // BLOCK, BLOCK).sum((1, 3)).astype(np.float32)


def render(char: str, rng: np.random.Generator) -> np.ndarray:
    """One printed ``char`` in a random font and pen, distorted and scanned: an 8x8 float32 array of
    ink counts 0-16 (the form of ``load_digits().images``)."""
    font = FONTS[int(rng.integers(len(FONTS)))]
    img = glyph(char, font, int(rng.integers(0, 4)))
    img = _affine(img, np.radians(rng.uniform(-12, 12)), rng.uniform(-0.35, 0.35), rng.uniform(0.7, 1.15))
    img = _elastic(img, rng, alpha=rng.uniform(0.0, 4.0), sigma=rng.uniform(4.0, 7.0))
    return scan(img, rng, flip=rng.uniform(0.0, 0.2), height=rng.uniform(0.85, 1.0))
