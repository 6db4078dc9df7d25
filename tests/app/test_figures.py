"""The confusion matrix figure: class names on its axes, in fonts that draw them."""

import logging

import matplotlib
import numpy as np
import pytest
from matplotlib import font_manager

from jtl.app import figures

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  pylint: disable=g-import-not-at-top

# Shipped inside matplotlib, so the same on every machine; it has Latin,
# Greek and Cyrillic glyphs and no CJK ones.
DEJAVU = font_manager.findfont(font_manager.FontProperties(family="DejaVu Sans"),
                               fallback_to_default=False)


def test_confusion_figure_has_class_names_and_readable_counts():
  confusion = np.array([[9, 1], [0, 7]])
  fig = figures.confusion_figure(confusion, ["cat", "dog"], title="t", fonts=[DEJAVU])
  ax = fig.axes[0]
  assert [t.get_text() for t in ax.get_xticklabels()] == ["cat", "dog"]
  assert [t.get_text() for t in ax.get_yticklabels()] == ["cat", "dog"]
  assert list(ax.get_xticks()) == [0, 1]  # one tick per class, not -0.5..1.5
  assert ax.get_title() == "t"
  colors = {t.get_text(): t.get_color() for t in ax.texts}
  assert colors == {"9": "white", "7": "white", "1": "black", "0": "black"}
  plt.close(fig)


def test_names_no_font_draws_are_numbered_and_named_in_a_warning(caplog):
  """The audit's CJK class names were drawn as boxes."""
  names = ["cat", "猫", "Ωmega", "犬 dog"]
  with caplog.at_level(logging.WARNING):
    fig = figures.confusion_figure(np.eye(4, dtype=int), names, title="test", fonts=[DEJAVU])
  ax = fig.axes[0]
  assert [t.get_text() for t in ax.get_yticklabels()] == ["cat", "1", "Ωmega", "3"]
  assert ax.get_title() == "test\n(classes 1, 3 numbered: see the JSON's names)"
  assert "No installed font draws the class names '猫', '犬 dog'" in caplog.text
  assert "fonts-noto-cjk" in caplog.text
  plt.close(fig)


def test_a_font_that_draws_a_name_is_added_as_a_fallback(tmp_path):
  """A second font that covers a character the first lacks is a fallback for
  the labels (its family after the first's); one that adds nothing is left out."""
  stix = font_manager.findfont(font_manager.FontProperties(family="STIXGeneral"),
                               fallback_to_default=False)
  extra = sorted(set(map(chr, _codepoints(stix))) - set(map(chr, _codepoints(DEJAVU))))
  assert extra, "STIX has glyphs DejaVu Sans lacks"
  name = "x" + extra[0]
  families, labels, numbered = figures.label_fonts(["cat", name], [DEJAVU, DEJAVU, stix])
  assert (families, labels, numbered) == (["DejaVu Sans", "STIXGeneral"], ["cat", name], [])
  families, labels, numbered = figures.label_fonts(["cat", name], [DEJAVU])
  assert (families, labels, numbered) == (["DejaVu Sans"], ["cat", "1"], [1])


def test_the_last_resort_font_is_no_fallback():
  """matplotlib >= 3.10 ships Last Resort, whose glyph for every character is a
  box naming its Unicode block: it 'covers' CJK without drawing it."""
  last_resort = [f.fname for f in font_manager.fontManager.ttflist
                 if f.name.startswith("Last Resort")]
  if not last_resort:
    pytest.skip(f"matplotlib {matplotlib.__version__} ships no Last Resort font")
  assert figures.label_fonts(["cat", "猫"], [DEJAVU, *last_resort]) == (
      ["DejaVu Sans"], ["cat", "1"], [1])


def _codepoints(file):
  from matplotlib import ft2font
  return ft2font.FT2Font(file).get_charmap()


@pytest.mark.parametrize("names", [[], ["a"]])
def test_label_fonts_keeps_the_first_font_first(names):
  assert figures.label_fonts(names, [DEJAVU])[0] == ["DejaVu Sans"]


def test_by_default_the_labels_start_with_matplotlibs_font():
  families, labels, numbered = figures.label_fonts(["cat", "dog"])
  default = font_manager.FontProperties(fname=font_manager.findfont(
      font_manager.FontProperties())).get_name()
  assert (families, labels, numbered) == ([default], ["cat", "dog"], [])
