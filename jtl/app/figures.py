"""The confusion matrix figure, its axes labelled with the class names in
fonts that can draw them.

matplotlib's default font (DejaVu Sans) has no CJK, Thai or Devanagari
glyphs: a folder of `猫/`, `犬/` would be labelled with boxes. The labels get
every installed font that covers a character the default lacks, as
fallbacks; a name that no installed font can draw is numbered by its label
index instead (the JSON beside the PNG keeps every name), and a warning says
which font to install.
"""
from __future__ import annotations

import functools
import logging
from typing import Any, Sequence

import numpy as np

from jtl import _optional

_LOG = logging.getLogger(__name__)


def confusion_figure(confusion: np.ndarray, names: list[str], *, title: str = "",
                     fonts: Sequence[str] | None = None) -> Any:
  """The confusion matrix as a matplotlib figure: true classes down, predicted
  across, labelled with the class names (up to 50 classes), counts written in
  each cell (up to 20 classes), white on dark cells and black on light ones.
  `fonts` (font files, default: matplotlib's font, then every installed one)
  are those the labels may use (`label_fonts`)."""
  matplotlib = _optional.require("matplotlib", "The confusion matrix figure")
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  n = len(confusion)
  side = min(4 + 0.45 * n, 24)
  fig, ax = plt.subplots(figsize=(side + 1, side))
  image = ax.imshow(confusion, cmap="Blues")
  fig.colorbar(image)
  ax.set_xlabel("predicted"), ax.set_ylabel("true")
  if n <= 50:  # class names on the axes; integer ticks only where they would not fit
    families, labels, numbered = label_fonts(names, fonts)
    ax.set_xticks(range(n), labels, rotation=90 if n > 5 else 0, fontfamily=families)
    ax.set_yticks(range(n), labels, fontfamily=families)
    if numbered:
      title = f"{title}\n(classes {', '.join(map(str, numbered))} numbered: see the JSON's names)"
  ax.set_title(title.strip())
  if n <= 20:
    dark = confusion.max() / 2 if confusion.size else 0
    for (i, j), v in np.ndenumerate(confusion):  # white on dark cells, black on light ones
      ax.text(j, i, str(v), ha="center", va="center", fontsize=8,
              color="white" if v > dark else "black")
  fig.tight_layout()
  return fig


def label_fonts(names: Sequence[str], fonts: Sequence[str] | None = None
                ) -> tuple[list[str], list[str], list[int]]:
  """(font families, first and fallbacks; the labels; the indices of the
  names numbered because no font in `fonts` draws them). `fonts` are font
  files, tried in order; default: matplotlib's default font, then every
  font matplotlib finds installed.

  >>> families, labels, numbered = label_fonts(["cat", "dog"])
  >>> labels, numbered
  (['cat', 'dog'], [])
  """
  missing = {c for name in names for c in name if not c.isspace()}
  if fonts is None:  # most names need no other font: look at the others only then
    default = _default_font()
    fonts = [default] if missing <= _charmap(default) else _installed_fonts()
  chosen = []
  for file in fonts:
    if _family(file).startswith("Last Resort"):
      continue  # its "glyphs" for every character are boxes naming the Unicode block
    covered = missing & _charmap(file)
    if covered or not chosen:  # the first font stays first, for the names it draws
      chosen.append(file)
      missing -= covered
    if not missing:
      break
  numbered = [i for i, name in enumerate(names) if missing & set(name)]
  if numbered:
    _LOG.warning(
        "No installed font draws the class names %s: the confusion matrix numbers them by "
        "their label instead. Install a font that covers them (e.g. `apt install "
        "fonts-noto-cjk` for Chinese, Japanese or Korean) to see the names.",
        ", ".join(repr(names[i]) for i in numbered))
  labels = [str(i) if i in numbered else name for i, name in enumerate(names)]
  _register(chosen)
  return [_family(file) for file in chosen], labels, numbered


def _default_font() -> str:
  """matplotlib's default font file (rcParams' family)."""
  from matplotlib import font_manager  # pylint: disable=g-import-not-at-top
  return font_manager.findfont(font_manager.FontProperties())


def _installed_fonts() -> list[str]:
  """matplotlib's default font file, then every other font file it knows or
  the system has (sorted, for the same choice on every run): its font list is
  cached, so it lacks fonts installed after matplotlib first ran."""
  from matplotlib import font_manager  # pylint: disable=g-import-not-at-top
  default = _default_font()
  known = {f.fname for f in font_manager.fontManager.ttflist}
  others = (known | set(font_manager.findSystemFonts())) - {default}
  return [default, *sorted(others, key=lambda file: (not _regular(file), file))]


@functools.lru_cache(maxsize=None)
def _regular(file: str) -> bool:
  """Whether a font file is of normal weight and style (a family's bold or
  italic file only covers what its regular one does)."""
  from matplotlib import font_manager, ft2font  # pylint: disable=g-import-not-at-top
  try:
    entry = font_manager.ttfFontProperty(ft2font.FT2Font(file))
  except (OSError, RuntimeError, ValueError):
    return False
  return entry.weight in (400, "normal", "regular") and entry.style == "normal"


def _register(files: Sequence[str]) -> None:
  """Adds to matplotlib's font list the files it lacks, so that their family
  names find them."""
  from matplotlib import font_manager  # pylint: disable=g-import-not-at-top
  known = {f.fname for f in font_manager.fontManager.ttflist}
  for file in files:
    if file not in known:
      font_manager.fontManager.addfont(file)


@functools.lru_cache(maxsize=None)
def _charmap(file: str) -> frozenset[str]:
  """The characters a font file has glyphs for (none if it cannot be read)."""
  from matplotlib import ft2font  # pylint: disable=g-import-not-at-top
  try:
    return frozenset(map(chr, ft2font.FT2Font(file).get_charmap()))
  except (OSError, RuntimeError, ValueError):
    return frozenset()


@functools.lru_cache(maxsize=None)
def _family(file: str) -> str:
  """The family name matplotlib knows a font file by."""
  from matplotlib import font_manager  # pylint: disable=g-import-not-at-top
  return font_manager.FontProperties(fname=file).get_name()
