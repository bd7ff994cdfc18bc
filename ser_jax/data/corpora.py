"""Corpus readers: each turns one corpus's on-disk layout into a `Corpus` listing."""

from __future__ import annotations

import collections
import csv
import dataclasses
import json
import logging
import os
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import NamedTuple

import soundfile

from ser_jax.data.corpus import Corpus, CorpusError, Skipped, Utterance
from ser_jax.data.demo import DEMO_CLASSES

CANONICAL_CLASSES = (
  "neutral",
  "happiness",
  "sadness",
  "anger",
  "boredom",
  "disgust",
  "fear",
  "surprise",
  "calm",
  "excitement",
  "frustration",
  "other",
)


@dataclasses.dataclass(frozen=True)
class _Options:
  """Reader options that only some corpora understand."""

  include_scripted: bool = False
  merge_excited: bool = False
  audio_root: str = ""
  case_insensitive_paths: bool = False


class Listing(NamedTuple):
  """What a lister found: every parseable utterance with its class, the files it left out,
  the corpus's own folds (`Corpus.fold_names`), notes on files whose metadata disagrees, and
  the corpus's name where it is not the reader's (EmoBox's 'emobox_<dataset>')."""

  utterances: list[Utterance]
  skipped: list[Skipped]
  fold_names: tuple[str, ...] = ()
  notes: Sequence[Skipped] = ()
  name: str = ""


# A lister returns a Listing, or (utterances, skipped) for a corpus without folds or notes.
_Lister = Callable[[Path, _Options], Listing | tuple[list[Utterance], list[Skipped]]]


@dataclasses.dataclass(frozen=True)
class Reader:
  """One corpus layout: its lister and native classes.

  Attributes:
    name: registry name.
    layout: the expected on-disk layout, quoted when a root does not match it.
    classes: native classes in canonical names; empty when a manifest defines them.
    lister: lists the utterances under a root.
    options: names of the `_Options` fields this corpus understands.
  """

  name: str
  layout: str
  classes: tuple[str, ...]
  lister: _Lister
  options: tuple[str, ...] = ()

  def __call__(
    self,
    root: str | os.PathLike,
    classes: Sequence[str] = (),
    **options,
  ) -> Corpus:
    """Lists the corpus at `root`, keeping the utterances of `classes`; `options` are
    `_Options` fields (include_scripted, merge_excited, audio_root, case_insensitive_paths)."""
    options = _Options(**options)
    for field in dataclasses.fields(options):
      if getattr(options, field.name) and field.name not in self.options:
        owners = ", ".join(r.name for r in CORPORA.values() if field.name in r.options)
        raise CorpusError(f"{field.name} applies only to {owners}, not {self.name}")
    if isinstance(classes, str):
      raise CorpusError(f"classes must be a sequence of names, got the string {classes!r}")
    path = Path(os.path.abspath(os.path.expanduser(root)))
    if not path.exists():
      raise CorpusError(f"data.root '{path}' does not exist")

    candidates, skipped, fold_names, notes, name = Listing(*self.lister(path, options))
    name = name or self.name
    if not candidates:
      detail = (
        f"; {len(skipped)} files did not parse, e.g. {_describe(skipped[0])}" if skipped else ""
      )
      raise CorpusError(f"no {self.name} corpus at '{path}': expected {self.layout}{detail}")
    _check_unique(candidates)

    present = {u.label for u in candidates}
    available = self.classes or tuple(sorted(present))
    # None asked for: every class the listing has, in the reader's order.
    every = tuple(c for c in available if c in present)
    chosen = _choose_classes(name, tuple(classes) or every, available)
    if options.merge_excited and "excitement" in chosen:
      raise CorpusError(
        "class 'excitement' cannot be chosen with merge_excited, which relabels it happiness"
      )

    left_out = collections.Counter(u.label for u in candidates if u.label not in chosen)
    _warn_of_near_classes(name, chosen, left_out)
    selected = []
    folders: dict[Path, list[str]] = {}
    for utt in candidates:
      if utt.label not in chosen:
        continue
      problem = _audio_problem(Path(utt.path), folders, "case_insensitive_paths" in self.options)
      if problem:
        skipped.append(Skipped(utt.path, problem))
      else:
        selected.append(utt)
    skipped.sort(key=lambda s: (s.path, s.reason))
    used = {u.path for u in selected}
    notes = tuple(sorted((n for n in notes if n.path in used), key=lambda n: n.path))
    if notes:
      logging.warning("%s", _notes_line(name, notes, len(selected)))
    corpus = Corpus(
      name=name,
      class_names=chosen,
      utterances=tuple(sorted(selected, key=lambda u: u.utt_id)),
      skipped=tuple(skipped),
      fold_names=fold_names,
      notes=notes,
      left_out=tuple(sorted(left_out.items())),
    )
    if not selected and skipped:
      raise CorpusError(
        f"no file of {name} at '{path}' could be used: {len(skipped)} skipped, e.g. "
        f"{_describe(skipped[0])}"
      )
    empty = [name for name, count in corpus.class_counts().items() if count == 0]
    if empty:
      detail = (
        f"; {len(skipped)} files were skipped, e.g. {_describe(skipped[0])}" if skipped else ""
      )
      raise CorpusError(f"class '{empty[0]}' has no utterances in {name} at '{path}'{detail}")
    return corpus


def _describe(skip: Skipped) -> str:
  return f"{skip.path}: {skip.reason}"


def _check_unique(utterances: Sequence[Utterance]) -> None:
  """One id, one utterance; one audio file, one utterance (listed twice, a file could be in
  a fold's train and test)."""
  ids: dict[str, str] = {}
  paths: dict[str, str] = {}
  for utt in utterances:
    if utt.utt_id in ids:
      raise CorpusError(
        f"utterance id '{utt.utt_id}' appears twice: {ids[utt.utt_id]} and {utt.path}"
      )
    if utt.path in paths:
      raise CorpusError(
        f"audio file {utt.path} is listed twice, as '{paths[utt.path]}' and '{utt.utt_id}'; "
        "list each file once"
      )
    ids[utt.utt_id], paths[utt.path] = utt.path, utt.utt_id


def _warn_of_near_classes(corpus: str, chosen: Sequence[str], left_out: Mapping[str, int]) -> None:
  """Labels that differ from a chosen class only in letter case or spaces are likely typos."""
  canonical: dict[str, str] = {}
  for name in chosen:
    if _folded(name) in canonical:
      logging.warning(
        "%s: classes '%s' and '%s' differ only in letter case or spaces",
        corpus,
        canonical[_folded(name)],
        name,
      )
    canonical.setdefault(_folded(name), name)
  for label, count in sorted(left_out.items()):
    if _folded(label) in canonical:
      logging.warning(
        "%s: %d utterances labelled '%s' are left out: the class is '%s' (labels must match "
        "exactly)",
        corpus,
        count,
        label,
        canonical[_folded(label)],
      )


def _folded(label: str) -> str:
  return "".join(label.split()).casefold()


def _choose_classes(
  corpus: str, requested: tuple[str, ...], available: tuple[str, ...]
) -> tuple[str, ...]:
  """Checks the requested class names against those the corpus has."""
  for i, name in enumerate(requested):
    if name not in available:
      raise CorpusError(
        f"unknown class '{name}' for {corpus}; expected one of: {', '.join(sorted(available))}"
      )
    if name in requested[:i]:
      raise CorpusError(f"class '{name}' is listed twice in {list(requested)}")
  return requested


def _audio_problem(path: Path, folders: dict[Path, list[str]], hint: bool) -> str | None:
  """Why an audio file cannot be used, or None if it can; a missing file whose name differs
  from one that exists only in letter case says so (with `hint`, how to use it)."""
  if not _is_utf8(str(path)):
    return "the path is not UTF-8 (its manifest and predictions could not name it); rename it"
  if not path.is_file():
    variant = case_variant(path, folders)
    if variant is None:
      return "audio file missing"
    way_out = " (data.case_insensitive_paths=True reads it)" if hint else ""
    return f"audio file missing; a file that differs only in letter case exists: {variant}{way_out}"
  if path.stat().st_size == 0:
    return "empty file (0 bytes)"
  return None


def _is_utf8(text: str) -> bool:
  try:
    text.encode("utf-8")
  except UnicodeEncodeError:  # Bytes the OS gave that are not UTF-8 (surrogate escapes).
    return False
  return True


def case_variant(path: Path, folders: dict[Path, list[str]]) -> Path | None:
  """The one existing file whose path differs from `path` only in letter case, or None.

  folders: a cache of folder listings, shared by the calls of one listing.
  """
  found = Path(path.anchor)
  for part in path.parts[1:]:
    if (found / part).exists():
      found = found / part
      continue
    if found not in folders:
      folders[found] = os.listdir(found) if found.is_dir() else []
    matches = [name for name in folders[found] if name.lower() == part.lower()]
    if len(matches) != 1:
      return None
    found = found / matches[0]
  return found if found.is_file() and found != path else None


def _notes_line(corpus: str, notes: Sequence[Skipped], n_used: int) -> str:
  """One line for every file whose metadata disagrees: counts per kind and an example each."""
  examples: dict[str, str] = {}
  counts: dict[str, int] = {}
  for note in notes:
    for part in note.reason.split("; "):
      kind = part.split(":", 1)[0]
      counts[kind] = counts.get(kind, 0) + 1
      examples.setdefault(kind, f"{Path(note.path).name}: {part.split(':', 1)[1].strip()}")
  kinds = "; ".join(f"{kind} {counts[kind]}, e.g. {examples[kind]}" for kind in counts)
  return (
    f"{corpus}: the metadata of {len(notes)} of {n_used} files disagrees with the file ({kinds}); "
    "used as the files are, each listed in the feature store's notes.csv"
  )


def _wav_files(folder: Path, *, recursive: bool) -> list[Path]:
  """The .wav files (any case) in `folder`, without macOS AppleDouble `._*` companions."""
  if not folder.is_dir():
    return []
  found = folder.rglob("*") if recursive else folder.iterdir()
  return sorted(
    p for p in found if p.suffix.lower() == ".wav" and not p.name.startswith("._") and p.is_file()
  )


def _classes_of(mapping: Mapping[str, str]) -> tuple[str, ...]:
  """The mapped classes, in canonical order."""
  return tuple(c for c in CANONICAL_CLASSES if c in mapping.values())


def _unknown_code(kind: str, code: str, allowed: Iterable[str]) -> str:
  return f"unknown {kind} '{code}'; expected one of: {', '.join(sorted(allowed))}"


@dataclasses.dataclass(frozen=True)
class _FileNames:
  """A corpus whose wav file names say each utterance's speaker and emotion: one lister
  for all of them (speaker and group are the named speaker).

  Attributes:
    corpus: the corpus's name in messages.
    pattern: matches a file's stem, with groups 'speaker' and 'emotion'.
    example: a file name of the pattern, quoted when a name does not match it.
    emotions: emotion code (as `code_case` spells it) -> class.
    code_kind: what a code is called in messages ('emotion letter').
    folder: the root's subfolder that holds the files, where it exists.
    recursive: whether files below the folder's subfolders count too.
    speaker: the speaker's id from the matched speaker.
    code_case: the code as `emotions` spells it (CREMA-D's and TESS's names vary in case).
    keep: whether a matched file is of the corpus's task (others are left out, not skipped).
  """

  corpus: str
  pattern: re.Pattern[str]
  example: str
  emotions: Mapping[str, str]
  code_kind: str
  folder: str = ""
  recursive: bool = False
  speaker: Callable[[str], str] = lambda speaker: speaker
  code_case: Callable[[str], str] = lambda code: code
  keep: Callable[[re.Match[str]], bool] = lambda match: True

  def speaker_of(self, stem: str) -> str | None:
    """The speaker a file's stem names, or None where the stem is not of the pattern."""
    match = self.pattern.match(stem)
    return None if match is None else self.speaker(match["speaker"])

  def __call__(self, root: Path, options: _Options) -> tuple[list[Utterance], list[Skipped]]:
    """The corpus's lister: every wav file under the root (or its `folder`)."""
    del options
    folder = root / self.folder if self.folder and (root / self.folder).is_dir() else root
    utterances, skipped = [], []
    for path in _wav_files(folder, recursive=self.recursive):
      match = self.pattern.match(path.stem)
      if not match:
        reason = f"name does not match the {self.corpus} pattern (e.g. {self.example})"
        skipped.append(Skipped(str(path), reason))
        continue
      if not self.keep(match):
        continue
      code = self.code_case(match["emotion"])
      if code not in self.emotions:
        skipped.append(Skipped(str(path), _unknown_code(self.code_kind, code, self.emotions)))
        continue
      speaker = self.speaker(match["speaker"])
      utterances.append(Utterance(path.stem, str(path), self.emotions[code], speaker, speaker))
    return utterances, skipped


_EMODB = _FileNames(
  corpus="EmoDB",
  # 03a01Fa = speaker 03, sentence a01, emotion F, version a.
  pattern=re.compile(r"^(?P<speaker>\d{2})[a-z]\d{2}(?P<emotion>[A-Z])[a-z]$"),
  example="03a01Fa.wav",
  emotions={
    "W": "anger",
    "L": "boredom",
    "E": "disgust",
    "A": "fear",
    "F": "happiness",
    "T": "sadness",
    "N": "neutral",
  },
  code_kind="emotion letter",
  folder="wav",
)
_RAVDESS = _FileNames(
  corpus="RAVDESS",
  # modality-channel-emotion-intensity-statement-repetition-actor.
  pattern=re.compile(
    r"^(?P<modality>\d{2})-(?P<channel>\d{2})-(?P<emotion>\d{2})-\d{2}-\d{2}-\d{2}-"
    r"(?P<speaker>\d{2})$"
  ),
  example="03-01-05-01-02-01-12.wav",
  emotions={
    "01": "neutral",
    "02": "calm",
    "03": "happiness",
    "04": "sadness",
    "05": "anger",
    "06": "fear",
    "07": "disgust",
    "08": "surprise",
  },
  code_kind="emotion code",
  recursive=True,
  speaker=lambda actor: f"Actor_{actor}",
  # Song (channel 02) and audio-visual recordings (modality 01, 02) are other tasks.
  keep=lambda match: match["modality"] == "03" and match["channel"] == "01",
)
_CREMA_D = _FileNames(
  corpus="CREMA-D",
  # actor_sentence_emotion_level.
  pattern=re.compile(r"^(?P<speaker>\d+)_[A-Z]+_(?P<emotion>[A-Z]+)_[A-Z]+$", re.IGNORECASE),
  example="1001_DFA_ANG_XX.wav",
  emotions={
    "ANG": "anger",
    "DIS": "disgust",
    "FEA": "fear",
    "HAP": "happiness",
    "NEU": "neutral",
    "SAD": "sadness",
  },
  code_kind="emotion code",
  folder="AudioWAV",
  code_case=str.upper,
)
_TESS = _FileNames(
  corpus="TESS",
  # <speaker>_<word>_<emotion>; releases differ in letter case.
  pattern=re.compile(r"^(?P<speaker>OAF|YAF)_.*_(?P<emotion>[^_]*)$", re.IGNORECASE),
  example="OAF_back_angry.wav",
  emotions={
    "angry": "anger",
    "disgust": "disgust",
    "fear": "fear",
    "happy": "happiness",
    "neutral": "neutral",
    "ps": "surprise",
    "sad": "sadness",
  },
  code_kind="emotion",
  recursive=True,
  speaker=str.upper,
  code_case=str.lower,
)


# IEMOCAP: evaluators' majority codes on each turn's summary line; xxx means no majority.
_IEMOCAP_CODES = {
  "neu": "neutral",
  "hap": "happiness",
  "sad": "sadness",
  "ang": "anger",
  "exc": "excitement",
  "fru": "frustration",
  "sur": "surprise",
  "fea": "fear",
  "dis": "disgust",
  "oth": "other",
}
_IEMOCAP_NO_MAJORITY = "xxx"
_IEMOCAP_RELEASE = "IEMOCAP_full_release"
# `[6.2901 - 8.2357]<TAB>Ses01F_impro01_F000<TAB>neu<TAB>[2.5000, 2.5000, 2.5000]`
_IEMOCAP_SUMMARY = re.compile(r"^\[\s*[\d.]+\s*-\s*[\d.]+\s*\]\s+(\S+)\s+(\S+)\s+\[[^\]]*\]$")
# The speaker's letter precedes the turn index; the letter after `Ses0N` is the dialog's.
_IEMOCAP_TURN = re.compile(r"^Ses(\d{2})[FM]_.+_([FM])\d{3}$")


def _list_iemocap(root: Path, options: _Options) -> tuple[list[Utterance], list[Skipped]]:
  release = root / _IEMOCAP_RELEASE if (root / _IEMOCAP_RELEASE).is_dir() else root
  utterances, skipped = [], []
  for session in range(1, 6):
    session_dir = release / f"Session{session}"
    labels_dir = session_dir / "dialog" / "EmoEvaluation"
    if not labels_dir.is_dir():
      continue
    # Only the top level: Categorical/, Attribute/ and Self-evaluation/ hold per-evaluator files.
    for label_file in sorted(labels_dir.glob("*.txt")):
      dialog = label_file.stem
      if dialog.startswith("._"):
        continue
      if not dialog.startswith("Ses") or ("impro" not in dialog and "script" not in dialog):
        skipped.append(
          Skipped(str(label_file), "not an IEMOCAP dialog label file (e.g. Ses01F_impro01.txt)")
        )
        continue
      if "script" in dialog and not options.include_scripted:
        continue
      wav_dir = session_dir / "sentences" / "wav" / dialog
      found, bad = _parse_emo_evaluation(label_file, wav_dir, session, options)
      utterances += found
      skipped += bad
  return utterances, skipped


def _parse_emo_evaluation(
  label_file: Path, wav_dir: Path, session: int, options: _Options
) -> tuple[list[Utterance], list[Skipped]]:
  """Reads the summary line that opens each blank-line separated block of a label file."""
  utterances, skipped = [], []
  dialog = label_file.stem
  block_start = True
  lines = label_file.read_text(encoding="utf-8", errors="replace").splitlines()
  for lineno, line in enumerate(lines, start=1):
    line = line.strip()
    if not line:
      block_start = True
      continue
    # Evaluator lines follow the summary line; a '[' also opens a block missing its blank line.
    if line.startswith("%") or not (block_start or line.startswith("[")):
      continue
    block_start = False
    where = f"{label_file.name}:{lineno}"
    summary = _IEMOCAP_SUMMARY.match(line)
    if not summary:
      skipped.append(Skipped(str(label_file), f"{where}: cannot parse label line {line!r}"))
      continue
    turn, code = summary.groups()
    speaker = _IEMOCAP_TURN.match(turn)
    if not speaker or not turn.startswith(f"{dialog}_") or int(speaker.group(1)) != session:
      reason = f"{where}: utterance '{turn}' is not a turn of Session{session} dialog '{dialog}'"
      skipped.append(Skipped(str(label_file), reason))
      continue
    if code == _IEMOCAP_NO_MAJORITY:
      continue
    if code not in _IEMOCAP_CODES:
      reason = _unknown_code("emotion code", code, [*_IEMOCAP_CODES, _IEMOCAP_NO_MAJORITY])
      skipped.append(Skipped(str(label_file), f"{where}: {reason}"))
      continue
    label = _IEMOCAP_CODES[code]
    if options.merge_excited and label == "excitement":
      label = "happiness"
    speaker_id = f"Ses{speaker.group(1)}_{speaker.group(2)}"
    utterances.append(
      Utterance(turn, str(wav_dir / f"{turn}.wav"), label, speaker_id, f"Session{session}")
    )
  return utterances, skipped


_CSV_MANIFEST = "manifest.csv"
_CSV_REQUIRED = ("path", "label")


def _list_csv(root: Path, options: _Options) -> tuple[list[Utterance], list[Skipped]]:
  del options
  manifest = root / _CSV_MANIFEST if root.is_dir() else root
  if not manifest.is_file():
    raise CorpusError(
      f"'{root}' is not a manifest: expected a CSV file or a folder containing {_CSV_MANIFEST}"
    )
  _check_utf8(manifest)
  folder = manifest.parent
  utterances, skipped, test_folds = [], [], []
  # utf-8-sig: a byte-order mark (as spreadsheet programs write) is not part of a column name.
  with open(manifest, newline="", encoding="utf-8-sig") as f:
    rows = csv.DictReader(f)
    columns = rows.fieldnames = [column.strip() for column in rows.fieldnames or []]
    for column in _CSV_REQUIRED:
      if column not in columns:
        raise CorpusError(
          f"manifest '{manifest}' has no '{column}' column; columns: {', '.join(columns)}"
        )
    for row in rows:
      rel, label = (row["path"] or "").strip(), (row["label"] or "").strip()
      where = f"{manifest.name}:{rows.line_num}"
      if not rel or not label:
        skipped.append(Skipped(str(manifest), f"{where}: empty path or label"))
        continue
      path = os.path.abspath(folder / rel)
      speaker = (row.get("speaker") or "").strip() or "unknown"
      group = (row.get("group") or "").strip() or speaker
      utt_id = (row.get("utt_id") or "").strip() or os.path.splitext(rel)[0]
      utterances.append(Utterance(utt_id, path, label, speaker, group))
      test_folds.append((row.get("fold") or "").strip())
  if "fold" not in columns:
    return utterances, skipped
  fold_names = _natural_order({fold for fold in test_folds if fold})
  return Listing(
    [
      dataclasses.replace(utt, splits=tuple("test" if f == fold else "train" for f in fold_names))
      for utt, fold in zip(utterances, test_folds, strict=True)
    ],
    skipped,
    fold_names,
  )


def _check_utf8(manifest: Path) -> None:
  """Raises CorpusError naming the first line of `manifest` that is not UTF-8."""
  for number, line in enumerate(manifest.read_bytes().splitlines(), start=1):
    try:
      line.decode("utf-8")
    except UnicodeDecodeError as error:
      raise CorpusError(
        f"manifest '{manifest}' is not UTF-8 (line {number}, byte {error.start + 1}: "
        f"{line[error.start : error.start + 1]!r}); save it as UTF-8"
      ) from error


def _natural_order(names: Iterable[str]) -> tuple[str, ...]:
  """Names sorted with their digits as numbers: fold_2 before fold_10."""
  return tuple(
    sorted(names, key=lambda n: [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", n)])
  )


# EmoBox (emo-box/EmoBox, data/<dataset>/): <dataset>.jsonl with one utterance a line,
# label_map.json (raw label -> the benchmark's class) where there is one, and its folds as
# fold_<k>/<dataset>_{train,test,valid}_fold_<k>.jsonl.
_EMOBOX_FOLD_FILE = re.compile(
  r"^(?P<dataset>.+)_(?P<role>train|test|valid)_fold_(?P<fold>\d+)\.jsonl$"
)
_EMOBOX_ROW_KEYS = ("key", "wav", "emo")
# The benchmark's class names (and a few spellings corpora use) in ser_jax's names; others
# are kept, lower-cased.
_EMOBOX_CLASSES = {
  "angry": "anger",
  "anger": "anger",
  "happy": "happiness",
  "happiness": "happiness",
  "sad": "sadness",
  "sadness": "sadness",
  "neutral": "neutral",
  "fear": "fear",
  "fearful": "fear",
  "disgust": "disgust",
  "disgusted": "disgust",
  "surprise": "surprise",
  "surprised": "surprise",
  "boredom": "boredom",
  "calm": "calm",
  "excited": "excitement",
  "excitement": "excitement",
  "frustration": "frustration",
  "other": "other",
}
# Metadata lengths within this of the file's are taken to agree.
_EMOBOX_LENGTH_TOLERANCE_SECONDS = 0.01


def emobox_class(name: str) -> str:
  """The benchmark's class name (e.g. 'Angry') in ser_jax's names (e.g. 'anger')."""
  lowered = name.strip().lower()
  return _EMOBOX_CLASSES.get(lowered, lowered.replace(" ", "_"))


# EmoBox's dataset names of the corpora whose file names ser_jax reads.
_EMOBOX_FILE_NAMES = {"emodb": _EMODB, "ravdess": _RAVDESS, "cremad": _CREMA_D, "tess": _TESS}


def _emobox_speaker(dataset: str, wav: str) -> tuple[str, str] | None:
  """(speaker, group) from the corpus's own naming, for corpora ser_jax has a reader for."""
  stem, parts = Path(wav).stem, Path(wav).parts
  if dataset in _EMOBOX_FILE_NAMES:
    speaker = _EMOBOX_FILE_NAMES[dataset].speaker_of(stem)
    return None if speaker is None else (speaker, speaker)
  if dataset == "iemocap" and (match := _IEMOCAP_TURN.match(stem)):
    return f"Ses{match.group(1)}_{match.group(2)}", f"Session{int(match.group(1))}"
  if dataset == "casia" and len(parts) >= 3:  # <speaker>/<emotion folder>/<id>.wav
    return parts[-3], parts[-3]
  return None


def _read_jsonl(path: Path) -> tuple[list[tuple[int, dict]], list[Skipped]]:
  """(line number, object) of each line of a JSON-lines file, and the lines that are not."""
  rows, skipped = [], []
  for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
    if not line.strip():
      continue
    try:
      row = json.loads(line)
    except json.JSONDecodeError as error:
      skipped.append(Skipped(str(path), f"{path.name}:{lineno}: not JSON ({error.msg})"))
      continue
    if not isinstance(row, dict) or any(not row.get(k) for k in _EMOBOX_ROW_KEYS):
      skipped.append(
        Skipped(str(path), f"{path.name}:{lineno}: needs {', '.join(_EMOBOX_ROW_KEYS)}")
      )
      continue
    rows.append((lineno, row))
  return rows, skipped


def _emobox_label_map(root: Path) -> dict[str, str]:
  """label_map.json with lower-cased keys ({} where there is none); keys that differ only
  in case must agree."""
  path = root / "label_map.json"
  if not path.is_file():
    return {}
  mapping: dict[str, str] = {}
  for raw, name in json.loads(path.read_text(encoding="utf-8")).items():
    if mapping.setdefault(raw.lower(), name) != name:
      raise CorpusError(
        f"{path}: keys that differ only in case map to different classes: '{raw}' -> "
        f"'{name}' and '{mapping[raw.lower()]}'"
      )
  return mapping


def _emobox_folds(root: Path, dataset: str) -> tuple[tuple[str, ...], dict[str, dict[str, str]]]:
  """The fold names (fold_<k>, in k order) and each fold's {key: role}."""
  roles: dict[str, dict[str, str]] = {}
  for folder in root.glob("fold_*"):
    for path in sorted(folder.glob("*.jsonl")):
      match = _EMOBOX_FOLD_FILE.match(path.name)
      # EmoDB's second set of files (emodb_test_fold1.jsonl) is not what EmoBox's recipe reads.
      if not match or match["dataset"] != dataset or f"fold_{match['fold']}" != folder.name:
        continue
      fold = roles.setdefault(folder.name, {})
      for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
          continue
        try:
          key = json.loads(line)["key"]
        except (json.JSONDecodeError, KeyError, TypeError) as error:
          raise CorpusError(f"{path}:{lineno}: not a JSON object with a key ({error})") from None
        if fold.setdefault(key, match["role"]) != match["role"]:
          raise CorpusError(
            f"{path}:{lineno}: '{key}' is in both the {fold[key]} and the {match['role']} "
            f"files of {folder.name}"
          )
  for name, fold in roles.items():
    if "test" not in fold.values():
      raise CorpusError(f"{root / name} has no {dataset}_test_{name}.jsonl (or it is empty)")
  return _natural_order(roles), roles


def _emobox_audio(root: Path, options: _Options, dataset: str, rows) -> Callable[[str], Path]:
  """Where each `wav` path's file is: under data.audio_root (default: two folders above the
  dataset folder, EmoBox's checkout), or under it less 'downloads/' or 'downloads/<dataset>/',
  whichever finds the most files."""
  audio_root = Path(os.path.abspath(os.path.expanduser(options.audio_root or root.parent.parent)))
  if not audio_root.is_dir():
    raise CorpusError(f"data.audio_root '{audio_root}' is not a folder")
  prefixes = ("", "downloads/", f"downloads/{dataset}/")

  def under(prefix: str) -> Callable[[str], Path]:
    return lambda wav: audio_root / (wav[len(prefix) :] if wav.startswith(prefix) else wav)

  hits = [sum(under(p)(row["wav"]).is_file() for _, row in rows) for p in prefixes]
  best = prefixes[hits.index(max(hits))]
  if best:
    logging.info("%s: wav paths read under %s less their '%s'", dataset, audio_root, best)
  return under(best)


def _emobox_note(row: dict, path: Path) -> str | None:
  """What the row says of the file that the file's header does not ('; '-separated)."""
  try:
    info = soundfile.info(str(path))
  except Exception:  # Unreadable: the store skips it, naming why.
    return None
  problems = []
  listed_rate = row.get("sample_rate")
  if listed_rate and int(listed_rate) != info.samplerate:
    problems.append(f"sample rate: {int(listed_rate)} Hz listed, {info.samplerate} Hz in the file")
  if row.get("channel") and int(row["channel"]) != info.channels:
    problems.append(f"channels: {int(row['channel'])} listed, {info.channels} in the file")
  if row.get("length") is not None:
    actual = info.frames / info.samplerate
    if abs(float(row["length"]) - actual) > _EMOBOX_LENGTH_TOLERANCE_SECONDS:
      problems.append(f"length: {float(row['length']):.3f} s listed, {actual:.3f} s in the file")
  return "; ".join(problems) or None


def _list_emobox(root: Path, options: _Options) -> Listing:
  dataset = root.name
  metadata = root / f"{dataset}.jsonl"
  if not metadata.is_file():
    found = sorted(p.name for p in root.glob("*.jsonl"))
    raise CorpusError(
      f"no {metadata.name} in '{root}' (data.root is an EmoBox dataset folder, data/<dataset>/"
      f"{'; found ' + ', '.join(found) if found else ''})"
    )
  rows, skipped = _read_jsonl(metadata)
  label_map = _emobox_label_map(root)
  fold_names, roles = _emobox_folds(root, dataset)
  audio_path = _emobox_audio(root, options, dataset, rows)
  utterances, notes, folders, resolved = [], [], {}, 0
  speakerless = 0
  for lineno, row in rows:
    raw = str(row["emo"])
    if label_map and raw.lower() not in label_map:
      reason = f"{metadata.name}:{lineno}: label '{raw}' is not in label_map.json"
      skipped.append(Skipped(str(metadata), f"{reason} (keys: {', '.join(sorted(label_map))})"))
      continue
    path = audio_path(row["wav"])
    if options.case_insensitive_paths and not path.is_file():
      variant = case_variant(path, folders)
      if variant is not None:
        path, resolved = variant, resolved + 1
    key = str(row["key"])
    speaker = _emobox_speaker(dataset, row["wav"])
    if speaker is None:
      speakerless += 1
      utt = key.removeprefix(f"{dataset}-")
      speaker = (utt, utt)
    label = emobox_class(label_map.get(raw.lower(), raw))
    splits = tuple(roles[fold].get(key, "") for fold in fold_names)
    utterances.append(Utterance(key, str(path), label, *speaker, splits))
    if path.is_file() and (note := _emobox_note(row, path)):
      notes.append(Skipped(str(path), note))
  unknown = sorted(
    {key for fold in roles.values() for key in fold} - {str(r["key"]) for _, r in rows}
  )
  if unknown:
    logging.warning(
      "%s: %d keys of the fold files are not in %s, e.g. %s; they are left out",
      dataset,
      len(unknown),
      metadata.name,
      unknown[0],
    )
  if resolved:
    logging.warning(
      "%s: %d wav paths name no file but one that differs only in letter case "
      "(data.case_insensitive_paths=True): read that one",
      dataset,
      resolved,
    )
  if speakerless:
    logging.info(
      "%s: ser_jax knows no speaker naming for it; each utterance's speaker is its key "
      "(folds by cv.scheme='speaker' are then not speaker-independent)",
      dataset,
    )
  return Listing(utterances, skipped, fold_names, notes, f"emobox_{dataset}")


CORPORA: Mapping[str, Reader] = {
  reader.name: reader
  for reader in (
    Reader(
      name="crema_d",
      layout="AudioWAV/<actor>_<sentence>_<EMO>_<level>.wav files (e.g. 1001_DFA_ANG_XX.wav)",
      classes=_classes_of(_CREMA_D.emotions),
      lister=_CREMA_D,
    ),
    Reader(
      name="csv",
      layout=f"a CSV manifest (or a folder with {_CSV_MANIFEST}) with path and label columns and at least one row",
      classes=(),
      lister=_list_csv,
    ),
    Reader(
      name="demo",
      layout=f"a demo corpus folder with {_CSV_MANIFEST} and at least one row",
      classes=DEMO_CLASSES,
      lister=_list_csv,
    ),
    Reader(
      name="emobox",
      layout=(
        "an EmoBox dataset folder data/<dataset>/ with <dataset>.jsonl, label_map.json and "
        "fold_<k>/<dataset>_{train,test}_fold_<k>.jsonl"
      ),
      classes=(),
      lister=_list_emobox,
      options=("audio_root", "case_insensitive_paths"),
    ),
    Reader(
      name="emodb",
      layout="wav/<speaker><sentence><emotion><version>.wav files (e.g. wav/03a01Fa.wav)",
      classes=_classes_of(_EMODB.emotions),
      lister=_EMODB,
    ),
    Reader(
      name="iemocap",
      layout=(
        f"{_IEMOCAP_RELEASE}/Session1..5/dialog/EmoEvaluation/<dialog>.txt label files "
        "with audio in SessionN/sentences/wav/<dialog>/<utterance>.wav"
      ),
      classes=_classes_of(_IEMOCAP_CODES),
      lister=_list_iemocap,
      options=("include_scripted", "merge_excited"),
    ),
    Reader(
      name="ravdess",
      layout="Actor_XX/03-01-EE-II-SS-RR-AA.wav files (audio-only speech)",
      classes=_classes_of(_RAVDESS.emotions),
      lister=_RAVDESS,
    ),
    Reader(
      name="tess",
      layout="<folder>/<OAF|YAF>_<word>_<emotion>.wav files (e.g. OAF_angry/OAF_back_angry.wav)",
      classes=_classes_of(_TESS.emotions),
      lister=_TESS,
    ),
  )
}


def _reader(name: str) -> Reader:
  if name not in CORPORA:
    raise CorpusError(f"unknown corpus '{name}'; expected one of: {', '.join(sorted(CORPORA))}")
  return CORPORA[name]


def available_classes(name: str) -> tuple[str, ...]:
  """Native classes of corpus `name` in canonical names; empty where a manifest defines them."""
  return _reader(name).classes


def read_corpus(
  name: str,
  root: str | os.PathLike,
  classes: Sequence[str] = (),
  **options,
) -> Corpus:
  """Lists corpus `name` at `root`, keeping `classes` (every class of the corpus if empty);
  `options`: include_scripted, merge_excited (IEMOCAP), audio_root, case_insensitive_paths
  (EmoBox)."""
  return _reader(name)(root, classes, **options)
