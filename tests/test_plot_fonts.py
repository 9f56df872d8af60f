"""scripts/plot_weights.py draws what UltraFeedback holds: CJK and emoji through fallback fonts (a warning naming the
package when none is installed), and characters split over byte-level tokens on the token that completes them."""

import pytest
from matplotlib import font_manager
from transformers import AutoTokenizer

from otpo_trl.cli import plot_weights as plot_weights_cli


CJK_AND_EMOJI = "巴黎 한국어 😀 🚀 🍕"


@pytest.fixture(scope="module")
def plot_weights():
    """The command line of scripts/plot_weights.py (a thin wrapper around it)."""
    return plot_weights_cli


def test_without_fallback_fonts_a_warning_names_the_packages(plot_weights):
    with pytest.warns(UserWarning, match=r"No installed font draws .*巴.*install .*fonts-noto-cjk.*fonts-symbola"):
        missing = plot_weights.warn_missing_glyphs(["Paris", CJK_AND_EMOJI], ["DejaVu Sans"])
    assert "巴" in missing and "🚀" in missing and "P" not in missing


@pytest.mark.skipif(
    not {"Noto Sans CJK JP", "Symbola"} <= set(font_manager.get_font_names()),
    reason="needs the Debian packages fonts-noto-cjk and fonts-symbola (.ci/run installs them)",
)
def test_installed_fallback_fonts_draw_cjk_and_emoji(plot_weights, recwarn):
    assert plot_weights.FONT_FAMILIES == ["DejaVu Sans", "Noto Sans CJK JP", "Symbola"]
    assert plot_weights.warn_missing_glyphs([CJK_AND_EMOJI, "↵ ⇥ ␣ ⋯"], plot_weights.FONT_FAMILIES) == ""
    assert not [w for w in recwarn if "No installed font" in str(w.message)]


@pytest.mark.skipif(
    not {"Noto Sans CJK JP", "Symbola"} <= set(font_manager.get_font_names()),
    reason="needs the Debian packages fonts-noto-cjk and fonts-symbola (.ci/run installs them)",
)
def test_fonts_installed_after_matplotlib_cached_its_list_are_found(plot_weights, monkeypatch):
    stale = [f for f in font_manager.fontManager.ttflist if f.name not in plot_weights.FALLBACK_FONTS]
    monkeypatch.setattr(font_manager.fontManager, "ttflist", stale)
    assert plot_weights.font_families() == ["DejaVu Sans", "Noto Sans CJK JP", "Symbola"]


def test_split_characters_are_drawn_on_the_token_that_completes_them(plot_weights, tiny_model_dir):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    text = f"Paris {CJK_AND_EMOJI}!"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert any("\ufffd" in tokenizer.decode([t]) for t in ids)  # the tiny byte-level BPE splits these characters
    labels = plot_weights.token_labels(tokenizer, ids)
    assert len(labels) == len(ids) and not any("\ufffd" in label for label in labels)
    assert "".join(label for label in labels if label != plot_weights.SPLIT_CHARACTER) == text
