"""Class shares on any corpus: the largest subset with given class shares, spread over speakers.

The rule, for class weights w (normalised to shares) and per-class counts:

- Kept per class: n_c is T * share_c rounded down or up, so |n_c - T * share_c| < 1,
  and the n_c sum to T. T is the largest total for which such counts fit the corpus
  (n_c <= count_c); the utterances left after rounding down go to the largest remainders
  (ties to the lower class index) among classes that have one to spare. The counts depend
  on the class counts and the shares only, computed in exact rational arithmetic (a float
  weight as the decimal it prints as), so a corpus's own counts as weights keep every
  utterance.
- Per speaker: within class c, speaker s keeps n_c * m_sc / count_c (m_sc: their
  utterances of c) rounded down or up by largest remainder, so each speaker keeps their
  proportion of the class within one utterance and speaker folds keep their class mix.
  Speakers whose proportion rounds down to zero get the utterances left over first, so a
  speaker loses all of a class only when they have fewer than count_c / n_c of it and
  there are more such speakers than utterances left over. Remaining ties fall at random.
- Which utterances within (speaker, class): drawn at random; everything random comes from
  `seed` (data.class_shares_seed), apart from the training seed.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from fractions import Fraction

import numpy as np

from ser_jax.config import ConfigError


class SharesError(ConfigError):
  """data.class_shares that this corpus cannot meet, or that are not class shares."""


def class_counts(labels: np.ndarray, n_classes: int) -> np.ndarray:
  """Utterances per class, [n_classes] int64, for labels [N] in 0..n_classes - 1."""
  labels = np.asarray(labels)
  if labels.size and (labels.min() < 0 or labels.max() >= n_classes):
    raise ValueError(
      f"labels range over {int(labels.min())}..{int(labels.max())} but there are "
      f"{n_classes} classes; labels must be class indices 0..{n_classes - 1}"
    )
  return np.bincount(labels.astype(np.int64), minlength=n_classes).astype(np.int64)


def target_counts(
  counts: Sequence[int] | np.ndarray,
  shares: Sequence[float],
  class_names: Sequence[str] = (),
) -> np.ndarray:
  """Per-class counts [n_classes] int64 of the largest subset with these shares (see module)."""
  counts = [int(c) for c in counts]
  names = tuple(class_names) or tuple(str(c) for c in range(len(counts)))
  weights = _shares(shares, len(counts), names)
  for count, weight, name in zip(counts, weights, names, strict=True):
    if count == 0:
      raise SharesError(
        f"class '{name}' has no utterances, but data.class_shares asks for it "
        f"(share {float(weight):.3g}); drop it from data.classes or check data.root"
      )
  # floor(T * share_c) <= count_c for every class exactly when T < (count_c + 1) / share_c.
  upper = min(Fraction(count + 1) / weight for count, weight in zip(counts, weights, strict=True))
  # Every T <= min(count_c / share_c) fits, so this loop ends within 1 / share_c steps.
  for total in range(min(math.ceil(upper) - 1, sum(counts)), -1, -1):
    kept = _apportion(total, weights, counts)
    if kept is not None:
      return np.asarray(kept, np.int64)
  raise AssertionError("unreachable: a total of 0 always fits")


def subset_to_shares(
  labels: np.ndarray,
  speakers: np.ndarray,
  shares: Sequence[float],
  seed: int,
  class_names: Sequence[str] = (),
) -> np.ndarray:
  """Sorted indices of the kept utterances: the largest subset with these class shares.

  Args:
    labels: [N] class indices.
    speakers: [N] speaker ids; what is dropped is spread over them (see module).
    shares: positive weights in class order, normalised to shares; (1099, 284, 608, 289)
      and (0.482, 0.125, 0.267, 0.127) ask for the same shares.
    seed: draws which utterances go (data.class_shares_seed).
    class_names: names for error messages; when given, their number is the number of classes,
      else len(shares) is.
  """
  labels = np.asarray(labels)
  speakers = np.asarray(speakers)
  if labels.shape != speakers.shape or labels.ndim != 1:
    raise ValueError(
      f"labels {labels.shape} and speakers {speakers.shape} must be [N] arrays of one length"
    )
  n_classes = len(class_names) or len(shares)
  counts = class_counts(labels, n_classes)
  kept_per_class = target_counts(counts, shares, class_names)
  rng = np.random.default_rng(seed)
  speaker_ids, speaker_of = np.unique(speakers, return_inverse=True)
  kept = []
  for label in range(n_classes):
    in_class = labels == label
    per_speaker = np.bincount(speaker_of[in_class], minlength=len(speaker_ids))
    keep = _spread(int(kept_per_class[label]), per_speaker, rng)
    for speaker in np.flatnonzero(per_speaker):
      indices = np.flatnonzero(in_class & (speaker_of == speaker))
      kept.append(rng.choice(indices, size=int(keep[speaker]), replace=False))
  return np.sort(np.concatenate(kept)) if kept else np.zeros(0, np.int64)


def _shares(shares: Sequence[float], n_classes: int, names: Sequence[str]) -> list[Fraction]:
  """The weights as exact shares that sum to 1; SharesError for a wrong length or weight."""
  if len(shares) != n_classes:
    raise SharesError(
      f"data.class_shares has {len(shares)} weights but there are {n_classes} classes "
      f"({', '.join(names)}); give one weight per class, in class order"
    )
  for weight, name in zip(shares, names, strict=True):
    if not (isinstance(weight, int | float | np.number) and math.isfinite(weight) and weight > 0):
      raise SharesError(
        f"data.class_shares={tuple(shares)!r} has weight {weight!r} for class '{name}'; "
        "every weight must be a number > 0 (drop the class from data.classes to leave it out)"
      )
  # Floats as the decimals they print as (0.482 is 482/1000): binary rounding would move
  # shares such as (0.4, 0.2) off the exact ties that decide a rounding.
  weights = [Fraction(w) if isinstance(w, int) else Fraction(repr(float(w))) for w in shares]
  total = sum(weights)
  return [w / total for w in weights]


def _apportion(total: int, shares: list[Fraction], caps: list[int]) -> list[int] | None:
  """Counts within one of total * share_c that sum to total and fit caps; None if none do."""
  exact = [total * share for share in shares]
  floors = [math.floor(x) for x in exact]
  if any(f > cap for f, cap in zip(floors, caps, strict=True)):
    return None
  # Only a class with a fractional part may round up, and only if it has one to spare.
  can_round_up = [
    c for c, (x, f, cap) in enumerate(zip(exact, floors, caps, strict=True)) if x != f and f < cap
  ]
  left = total - sum(floors)
  if len(can_round_up) < left:
    return None
  can_round_up.sort(key=lambda c: (floors[c] - exact[c], c))
  for c in can_round_up[:left]:
    floors[c] += 1
  return floors


def _spread(kept: int, per_speaker: np.ndarray, rng: np.random.Generator) -> np.ndarray:
  """Kept per speaker [n_speakers]: `kept` spread in proportion to per_speaker (see module)."""
  count = int(per_speaker.sum())
  numerators = kept * per_speaker.astype(np.int64)
  floors = numerators // max(count, 1)
  remainders = numerators - floors * count  # In units of 1 / count.
  left = kept - int(floors.sum())
  candidates = np.flatnonzero(remainders > 0)
  # Priority: would otherwise keep none, then the largest remainder, then at random.
  order = np.lexsort((rng.random(len(candidates)), -remainders[candidates], floors[candidates] > 0))
  floors[candidates[order[:left]]] += 1
  return floors
