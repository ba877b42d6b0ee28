"""Printed glyphs from matplotlib's fonts, digitised like optdigits (tldist.data.glyphs)."""

from __future__ import annotations

import numpy as np

from tldist.data.glyphs import FONTS, font_path, glyph, render, scan


def test_every_font_draws_distinct_digits_and_fonts_differ():
    for font in FONTS:
        assert font_path(font).is_file()
        drawn = [glyph(d, font, 0) > 127 for d in "0123456789"]
        assert all(g.sum() > 20 for g in drawn), font  # a real glyph, not a blank
        assert len({g.tobytes() for g in drawn}) == 10, font  # not one box for every digit
    for d in "0123456789":  # the same digit looks different in different fonts
        assert len({(glyph(d, f, 0) > 127).tobytes() for f in FONTS}) == len(FONTS)
    assert (glyph("7", FONTS[0], 3) > 127).sum() > (glyph("7", FONTS[0], 0) > 127).sum()  # a wider pen


def test_scan_is_optdigits_like():
    ink = np.zeros((64, 64), np.uint8)
    ink[10:50, 20:40] = 255  # a 40 x 20 bar: scaled to 32 px high, 16 wide, centred
    counts = scan(ink, np.random.default_rng(0))
    assert counts.shape == (8, 8) and counts.dtype == np.float32
    assert counts.min() == 0 and counts.max() == 16 and set(np.unique(counts)) <= set(range(17))
    assert (counts[:, 2:6] == 16).all() and (counts[:, [0, 1, 6, 7]] == 0).all()
    assert scan(np.zeros((64, 64), np.uint8), np.random.default_rng(0)).sum() == 0
    noisy = scan(ink, np.random.default_rng(0), flip=0.5)
    assert 0 < np.abs(noisy - counts).sum() and (noisy[:, [0, 7]] == 0).all()  # flips only next to strokes


def test_render_is_seeded_and_varied():
    a = [render("3", np.random.default_rng([1, i])) for i in range(6)]
    b = [render("3", np.random.default_rng([1, i])) for i in range(6)]
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert len({x.tobytes() for x in a}) == 6
    assert all(x.shape == (8, 8) and 0 <= x.min() and x.max() <= 16 and x.sum() > 0 for x in a)
