"""The fonts the pictures draw text with: DejaVu Sans, then CJK and symbol fallbacks where installed.

Looked for once, on first use ([`use_fonts`], called by the drawing), not at import: finding a font installed after
matplotlib cached its font list means scanning the system's font files, which an `otpo-trl plot-weights --help` or an
`import` should not pay for. A character no installed font has is drawn as a box, and [`warn_missing_glyphs`] names
the package to install (docs/evaluation.md).
"""

import functools
import logging
import warnings
from pathlib import Path

import matplotlib
from matplotlib import font_manager
from matplotlib.font_manager import FontProperties
from matplotlib.ft2font import FT2Font


# Fonts tried in turn for each character after DejaVu Sans (matplotlib's own: Latin, Greek, Cyrillic, arrows, a few
# emoji), with the Debian/Ubuntu package of each. Colour emoji fonts (Noto Color Emoji) are bitmaps Agg cannot draw.
FALLBACK_FONTS = {"Noto Sans CJK JP": "fonts-noto-cjk", "Symbola": "fonts-symbola"}
_FONT_FILES = {"Noto Sans CJK JP": "NotoSansCJK", "Symbola": "Symbola"}  # how their files' names start


def font_families() -> list[str]:
    """DejaVu Sans, then those of `FALLBACK_FONTS` that are installed. A font installed after matplotlib cached its
    font list is missing from that list: it is looked for among the system's font files and added."""
    installed = {font.name for font in font_manager.fontManager.ttflist}
    if not set(FALLBACK_FONTS) <= installed:
        for path in font_manager.findSystemFonts():
            if any(Path(path).name.startswith(_FONT_FILES[name]) for name in set(FALLBACK_FONTS) - installed):
                font_manager.fontManager.addfont(path)
        installed = {font.name for font in font_manager.fontManager.ttflist}
    return ["DejaVu Sans", *(name for name in FALLBACK_FONTS if name in installed)]


@functools.cache
def use_fonts() -> list[str]:
    """The [`font_families`], looked for on the first call only and made matplotlib's `font.family` for this
    process. Call it before making any `FontProperties`: each takes the family list when it is made."""
    families = font_families()
    matplotlib.rcParams["font.family"] = families
    # Symbola has no bold face: matplotlib would say so for every bold title. Missing glyphs are warned about below.
    logging.getLogger("matplotlib.font_manager").setLevel(logging.ERROR)
    return families


def missing_glyphs(texts: list[str], families: list[str]) -> str:
    """The characters of `texts` (whitespace aside) that none of the font `families` can draw, sorted."""
    fonts = [FT2Font(font_manager.findfont(FontProperties(family=f), fallback_to_default=False)) for f in families]
    characters = {c for text in texts for c in text if not c.isspace()}
    return "".join(sorted(c for c in characters if not any(font.get_char_index(ord(c)) for font in fonts)))


def warn_missing_glyphs(texts: list[str], families: list[str] | None = None) -> str:
    """Warn (naming the font packages to install) when some character of `texts` has no glyph in `families`
    (default: [`use_fonts`]); return those characters."""
    families = use_fonts() if families is None else families
    missing = missing_glyphs(texts, families)
    if missing:
        absent = [
            f"{name} (Debian/Ubuntu: {package})" for name, package in FALLBACK_FONTS.items() if name not in families
        ]
        fix = f"install {' and '.join(absent)}" if absent else "no font configured here covers them"
        warnings.warn(
            f"No installed font draws {missing[:40]!r}: they appear as boxes. To draw them, {fix}.", stacklevel=2
        )
    return missing


__all__ = ["FALLBACK_FONTS", "font_families", "missing_glyphs", "use_fonts", "warn_missing_glyphs"]
