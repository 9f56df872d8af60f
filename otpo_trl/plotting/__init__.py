"""Pictures of OT token weights (needs matplotlib: `pip install 'otpo-trl[viz]'`).

- `pair_figure`: one pair's token weights and transport plan ([`plot_pair`]), the picture `otpo-trl plot-weights`
  writes (docs/evaluation.md).
- `fonts`: the fonts its text is drawn with, looked for on first use, and the warning for characters none of them has.

The command line is `otpo_trl.cli.plot_weights`; this package draws, and neither loads models nor writes files.
"""

from .fonts import use_fonts, warn_missing_glyphs
from .pair_figure import plot_pair, token_labels


__all__ = ["plot_pair", "token_labels", "use_fonts", "warn_missing_glyphs"]
