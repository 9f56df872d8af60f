"""scripts/plot_weights.py draws what UltraFeedback holds: CJK and emoji through fallback fonts (a warning naming the
package when none is installed), and characters split over byte-level tokens on the token that completes them. The
fonts are looked for on the first picture, not when the command is imported."""

import subprocess
import sys

import pytest
from matplotlib import font_manager
from transformers import AutoTokenizer

from otpo_trl.plotting import fonts, pair_figure


CJK_AND_EMOJI = "巴黎 한국어 😀 🚀 🍕"


@pytest.fixture(scope="module")
def plot_weights():
    """What scripts/plot_weights.py draws with: its fonts and its picture of a pair."""
    return fonts


def test_without_fallback_fonts_a_warning_names_the_packages(plot_weights):
    with pytest.warns(UserWarning, match=r"No installed font draws .*巴.*install .*fonts-noto-cjk.*fonts-symbola"):
        missing = plot_weights.warn_missing_glyphs(["Paris", CJK_AND_EMOJI], ["DejaVu Sans"])
    assert "巴" in missing and "🚀" in missing and "P" not in missing


@pytest.mark.skipif(
    not {"Noto Sans CJK JP", "Symbola"} <= set(font_manager.get_font_names()),
    reason="needs the Debian packages fonts-noto-cjk and fonts-symbola (.ci/run installs them)",
)
def test_installed_fallback_fonts_draw_cjk_and_emoji(plot_weights, recwarn):
    assert plot_weights.use_fonts() == ["DejaVu Sans", "Noto Sans CJK JP", "Symbola"]
    assert plot_weights.warn_missing_glyphs([CJK_AND_EMOJI, "↵ ⇥ ␣ ⋯"], plot_weights.use_fonts()) == ""
    assert not [w for w in recwarn if "No installed font" in str(w.message)]


@pytest.mark.skipif(
    not {"Noto Sans CJK JP", "Symbola"} <= set(font_manager.get_font_names()),
    reason="needs the Debian packages fonts-noto-cjk and fonts-symbola (.ci/run installs them)",
)
def test_fonts_installed_after_matplotlib_cached_its_list_are_found(plot_weights, monkeypatch):
    stale = [f for f in font_manager.fontManager.ttflist if f.name not in plot_weights.FALLBACK_FONTS]
    monkeypatch.setattr(font_manager.fontManager, "ttflist", stale)
    assert plot_weights.font_families() == ["DejaVu Sans", "Noto Sans CJK JP", "Symbola"]


def test_split_characters_are_drawn_on_the_token_that_completes_them(tiny_model_dir):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    text = f"Paris {CJK_AND_EMOJI}!"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert any("\ufffd" in tokenizer.decode([t]) for t in ids)  # the tiny byte-level BPE splits these characters
    labels = pair_figure.token_labels(tokenizer, ids)
    assert len(labels) == len(ids) and not any("\ufffd" in label for label in labels)
    assert "".join(label for label in labels if label != pair_figure.SPLIT_CHARACTER) == text


def test_the_fonts_are_looked_for_on_the_first_picture_not_at_import():
    """Importing the command (as `otpo-trl plot-weights --help` does) scans no font and changes no matplotlib setting;
    the first picture does both, once."""
    code = """
import matplotlib
from otpo_trl.cli import plot_weights
from otpo_trl.plotting import fonts
assert fonts.use_fonts.cache_info().currsize == 0, "the fonts were looked for at import"
assert matplotlib.rcParams["font.family"] == ["sans-serif"], matplotlib.rcParams["font.family"]
from types import SimpleNamespace
import torch
stats = SimpleNamespace(chosen_tokens=[["a", "b"]], rejected_tokens=[["c"]], chosen_weights=torch.ones(1, 2),
                        rejected_weights=torch.ones(1, 1), plan=torch.ones(1, 2, 1))
plot_weights.plot_pair(stats, 0, ["title"], max_tokens=8)
assert fonts.use_fonts.cache_info().currsize == 1, "the picture did not look for its fonts"
assert matplotlib.rcParams["font.family"][0] == "DejaVu Sans"
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
