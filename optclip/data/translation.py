"""English→French sentence pairs.

Offline default: the gettext catalogues that ship with the operating system
(``/usr/share/locale/fr/LC_MESSAGES/*.mo``): every message id (English) with its French
translation, whitespace-normalised, deduplicated on the English side, filtered by length.
The paper's data set (opus_books en-fr) is read from a local `datasets` folder.
"""

from __future__ import annotations

import gettext
import glob
import os

from optclip.data.common import DataNotFound, content_hash, load_local_dataset

DEFAULT_LOCALE_DIR = "/usr/share/locale/fr/LC_MESSAGES"


def _normalise(text: str) -> str:
  return " ".join(text.split())


def gettext_pairs(locale_dir: str = DEFAULT_LOCALE_DIR, *, min_chars: int = 4,
                  max_chars: int = 120):
  """(en, fr) pairs from the .mo files in ``locale_dir``, sorted by file then message id.

  Returns:
    (pairs, info) with info = {source, files, size, sha256}.
  """
  files = sorted(glob.glob(os.path.join(locale_dir, "*.mo")))
  if not files:
    raise DataNotFound(f"no gettext catalogues (*.mo) in {locale_dir}; install the "
                       "operating system's French language packs or pass --data-dir with "
                       "opus_books")
  pairs, seen = [], set()
  for file in files:
    try:
      with open(file, "rb") as handle:
        catalog = gettext.GNUTranslations(handle)._catalog
    except (OSError, UnicodeDecodeError, ValueError, KeyError):  # a corrupt catalogue
      continue
    for key in sorted(catalog, key=repr):
      english = _normalise(key[0] if isinstance(key, tuple) else key)
      french = _normalise(catalog[key])
      if (not english or not french or english in seen or english == french
          or not (min_chars <= len(english) <= max_chars)
          or not (min_chars <= len(french) <= max_chars)):
        continue
      seen.add(english)
      pairs.append((english, french))
  info = {"source": f"gettext catalogues {locale_dir}/*.mo", "files": len(files),
          "size": len(pairs), "sha256": content_hash(pairs)}
  return pairs, info


OPUS_BOOKS = ("python -c \"import datasets; datasets.load_dataset('opus_books', 'en-fr')"
              ".save_to_disk('DATA/opus_books')\"")


def opus_books(data_dir: str | None):
  """The paper's opus_books en-fr pairs from ``data_dir/opus_books`` (save_to_disk format,
  the hub's DatasetDict: every split, rows of ``translation`` = {"en": ..., "fr": ...})."""
  data, path, splits = load_local_dataset(data_dir, "opus_books", OPUS_BOOKS, ("translation",))
  pairs = [(_normalise(t["en"]), _normalise(t["fr"])) for t in data["translation"]]
  return pairs, {"source": path, "splits": splits, "size": len(pairs),
                 "sha256": content_hash(pairs)}
