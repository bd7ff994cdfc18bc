"""The corpus interface: every reader yields one `Corpus` listing for the feature store."""

from __future__ import annotations

import dataclasses


class CorpusError(ValueError):
  """A corpus that cannot be read as asked: a wrong root, a bad label file, a bad class."""


@dataclasses.dataclass(frozen=True)
class Utterance:
  """One labelled recording.

  Attributes:
    utt_id: unique id within the corpus (e.g. 'Ses01F_impro01_M000').
    path: absolute path of the audio file.
    label: class name (one of `Corpus.class_names`).
    speaker: speaker id, unique across the corpus (e.g. 'Ses01_M').
    group: a coarser grouping for held-out folds (e.g. 'Session1'); the speaker if none.
    splits: its role in each of the corpus's own folds (`Corpus.fold_names` order): 'train',
      'test', 'valid', or '' where a fold does not list it; empty for corpora without folds.
  """

  utt_id: str
  path: str
  label: str
  speaker: str
  group: str
  splits: tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True)
class Skipped:
  """A file left out of the listing, and why."""

  path: str
  reason: str


@dataclasses.dataclass(frozen=True)
class Corpus:
  """A corpus listing: utterances sorted by `utt_id`, class names in label-index order.

  fold_names: the corpus's own folds (EmoBox's fold_<k> files, a manifest's fold column),
  which `Utterance.splits` refer to; empty where it has none.
  notes: files used as they are, with what their metadata says that the file does not.
  left_out: (label, count) of the listed utterances whose label is not a chosen class.
  """

  name: str
  class_names: tuple[str, ...]
  utterances: tuple[Utterance, ...]
  skipped: tuple[Skipped, ...] = ()
  fold_names: tuple[str, ...] = ()
  notes: tuple[Skipped, ...] = ()
  left_out: tuple[tuple[str, int], ...] = ()

  def label_indices(self) -> list[int]:
    index = {name: i for i, name in enumerate(self.class_names)}
    return [index[u.label] for u in self.utterances]

  def class_counts(self) -> dict[str, int]:
    counts = dict.fromkeys(self.class_names, 0)
    for u in self.utterances:
      counts[u.label] += 1
    return counts
