"""Summarises a corpus listing (classes, speakers, groups, skipped files) without decoding audio.

python -m ser_jax.data.info --corpus=iemocap --root=/data/IEMOCAP_full_release
"""

from __future__ import annotations

import collections
import sys
from collections.abc import Sequence

from absl import app, flags

from ser_jax import command_line
from ser_jax.config import default_config
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
    *(
      [
        "left out, labels not among the classes: "
        + ", ".join(f"{label} {count}" for label, count in corpus.left_out),
        "",
      ]
      if corpus.left_out
      else []
    ),
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


def define_flags(values: flags.FlagValues) -> None:
  """The command line's flags."""
  flags.DEFINE_string(
    "corpus", None, f"One of: {', '.join(sorted(CORPORA))}.", flag_values=values, required=True
  )
  flags.DEFINE_string(
    "root", None, "Corpus folder (or manifest for csv).", flag_values=values, required=True
  )
  flags.DEFINE_string(
    "classes",
    ",".join(default_config().data.classes),
    "Comma-separated class names, in label order: by default data.classes' default (what a "
    "run trains on unless told otherwise); empty: every class of the corpus.",
    flag_values=values,
  )
  flags.DEFINE_bool("include_scripted", False, "iemocap: add scripted.", flag_values=values)
  flags.DEFINE_bool(
    "merge_excited", False, "iemocap: relabel excitement as happiness.", flag_values=values
  )
  flags.DEFINE_string(
    "audio_root", "", "emobox: the folder its wav paths are relative to.", flag_values=values
  )
  flags.DEFINE_bool(
    "case_insensitive_paths",
    False,
    "emobox: read a file whose path differs only in letter case.",
    flag_values=values,
  )


def info(values: flags.FlagValues, arguments: Sequence[str]) -> int:
  """Reads the corpus and prints its summary; returns the exit status."""
  if arguments:
    raise app.UsageError(f"unexpected arguments: {' '.join(arguments)}")
  classes = [c.strip() for c in values.classes.split(",") if c.strip()]
  try:
    corpus = read_corpus(
      values.corpus,
      values.root,
      classes,
      include_scripted=values.include_scripted,
      merge_excited=values.merge_excited,
      audio_root=values.audio_root,
      case_insensitive_paths=values.case_insensitive_paths,
    )
  except CorpusError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  print(format_summary(corpus))
  return 0


def main(argv: Sequence[str] | None = None) -> int:
  """`python -m ser_jax.data.info --corpus=NAME --root=PATH`; `argv` as
  command_line.run_flags takes it."""
  return command_line.run_flags(define_flags, info, argv)


if __name__ == "__main__":
  sys.exit(main())
