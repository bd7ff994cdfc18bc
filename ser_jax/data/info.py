"""Summarises a corpus listing (classes, speakers, groups, skipped files) without reading audio.

python -m ser_jax.data.info --corpus=iemocap --root=/data/IEMOCAP_full_release
"""

from __future__ import annotations

import argparse
import collections
import sys
from collections.abc import Sequence

from ser_jax.data.corpora import CORPORA, read_corpus
from ser_jax.data.corpus import Corpus, CorpusError


def _table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
  """Plain-text table: the first column left-aligned, the others right-aligned."""
  cells = [[str(c) for c in row] for row in [header, *rows]]
  widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
  lines = []
  for row in cells:
    first = row[0].ljust(widths[0])
    rest = [c.rjust(w) for c, w in zip(row[1:], widths[1:], strict=True)]
    lines.append("  ".join([first, *rest]).rstrip())
  return "\n".join(lines)


_ROLES = ("train", "test", "valid")


def format_summary(corpus: Corpus) -> str:
  """The report `main` prints for one corpus listing."""
  counts = corpus.class_counts()
  total = len(corpus.utterances)
  class_rows = [(name, n, f"{100 * n / total:.1f}%") for name, n in counts.items()]
  class_rows.append(("total", total, "100.0%"))

  per_speaker: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
  group_of = {}
  for utt in corpus.utterances:
    per_speaker[utt.speaker][utt.label] += 1
    group_of[utt.speaker] = utt.group
  speaker_rows = [
    (
      speaker,
      group_of[speaker],
      *(per_speaker[speaker][c] for c in corpus.class_names),
      sum(per_speaker[speaker].values()),
    )
    for speaker in sorted(per_speaker)
  ]

  parts = [
    f"corpus {corpus.name}: {total} utterances, {len(corpus.class_names)} classes",
    "",
    _table(("class", "count", "share"), class_rows),
    "",
    _table(("speaker", "group", *corpus.class_names, "total"), speaker_rows),
    "",
    f"{len(per_speaker)} speakers, {len(set(group_of.values()))} groups",
  ]
  if corpus.fold_names:
    fold_rows = [
      (name, *(sum(u.splits[k] == role for u in corpus.utterances) for role in _ROLES))
      for k, name in enumerate(corpus.fold_names)
    ]
    parts += ["", _table(("given fold", *_ROLES), fold_rows), ""]
  parts += [
    f"{len(corpus.skipped)} files skipped" + (":" if corpus.skipped else ""),
  ]
  parts += [f"  {s.path}: {s.reason}" for s in corpus.skipped]
  return "\n".join(parts)


def main(argv: Sequence[str] | None = None) -> int:
  """Parses flags, reads the corpus and prints its summary; returns the exit status."""
  parser = argparse.ArgumentParser(prog="python -m ser_jax.data.info", description=__doc__)
  parser.add_argument("--corpus", required=True, help=f"one of: {', '.join(sorted(CORPORA))}")
  parser.add_argument("--root", required=True, help="corpus folder (or manifest for csv)")
  parser.add_argument(
    "--classes", default="", help="comma-separated class names; empty for the corpus defaults"
  )
  parser.add_argument("--include_scripted", action="store_true", help="iemocap: add scripted")
  parser.add_argument(
    "--merge_excited", action="store_true", help="iemocap: relabel excitement as happiness"
  )
  parser.add_argument(
    "--audio_root", default="", help="emobox: the folder its wav paths are relative to"
  )
  parser.add_argument(
    "--case_insensitive_paths",
    action="store_true",
    help="emobox: read a file whose path differs only in letter case",
  )
  args = parser.parse_args(argv)
  classes = [c.strip() for c in args.classes.split(",") if c.strip()]
  try:
    corpus = read_corpus(
      args.corpus,
      args.root,
      classes,
      include_scripted=args.include_scripted,
      merge_excited=args.merge_excited,
      audio_root=args.audio_root,
      case_insensitive_paths=args.case_insensitive_paths,
    )
  except CorpusError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  print(format_summary(corpus))
  return 0


if __name__ == "__main__":
  sys.exit(main())
