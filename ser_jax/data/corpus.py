"""The corpus interface: every reader yields one `Corpus` listing for the feature store."""

from __future__ import annotations

import dataclasses
import hashlib
import json


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
  """

  utt_id: str
  path: str
  label: str
  speaker: str
  group: str


@dataclasses.dataclass(frozen=True)
class Skipped:
  """A file left out of the listing, and why."""

  path: str
  reason: str


@dataclasses.dataclass(frozen=True)
class Corpus:
  """A corpus listing: utterances sorted by `utt_id`, class names in label-index order."""

  name: str
  class_names: tuple[str, ...]
  utterances: tuple[Utterance, ...]
  skipped: tuple[Skipped, ...] = ()

  def label_indices(self) -> list[int]:
    index = {name: i for i, name in enumerate(self.class_names)}
    return [index[u.label] for u in self.utterances]

  def class_counts(self) -> dict[str, int]:
    counts = dict.fromkeys(self.class_names, 0)
    for u in self.utterances:
      counts[u.label] += 1
    return counts

  def fingerprint(self) -> str:
    """Hash of the listing (ids, paths, labels, speakers, file sizes are not read)."""
    listing = [dataclasses.astuple(u) for u in self.utterances]
    payload = json.dumps([self.name, list(self.class_names), listing])
    return hashlib.sha256(payload.encode()).hexdigest()
