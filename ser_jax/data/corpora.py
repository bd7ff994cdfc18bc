"""Corpus readers: each turns one corpus's on-disk layout into a `Corpus` listing."""

from __future__ import annotations

import csv
import dataclasses
import os
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path

from ser_jax.data.corpus import Corpus, CorpusError, Skipped, Utterance

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
DEFAULT_CLASSES = ("neutral", "happiness", "sadness", "anger")


@dataclasses.dataclass(frozen=True)
class _Options:
  """Reader options that only some corpora understand."""

  include_scripted: bool = False
  merge_excited: bool = False


# A lister returns every parseable utterance with its class, and the files it left out.
_Lister = Callable[[Path, _Options], tuple[list[Utterance], list[Skipped]]]


@dataclasses.dataclass(frozen=True)
class Reader:
  """One corpus layout: its lister, native classes and default class selection.

  Attributes:
    name: registry name.
    layout: the expected on-disk layout, quoted when a root does not match it.
    classes: native classes in canonical names; empty when a manifest defines them.
    default_classes: classes used when none are asked for; empty means all present.
    lister: lists the utterances under a root.
    options: names of the `_Options` fields this corpus understands.
  """

  name: str
  layout: str
  classes: tuple[str, ...]
  default_classes: tuple[str, ...]
  lister: _Lister
  options: tuple[str, ...] = ()

  def __call__(
    self,
    root: str | os.PathLike,
    classes: Sequence[str] = (),
    *,
    include_scripted: bool = False,
    merge_excited: bool = False,
  ) -> Corpus:
    """Lists the corpus at `root`, keeping the utterances of `classes`."""
    options = _Options(include_scripted=include_scripted, merge_excited=merge_excited)
    for field in dataclasses.fields(options):
      if getattr(options, field.name) and field.name not in self.options:
        owners = ", ".join(r.name for r in CORPORA.values() if field.name in r.options)
        raise CorpusError(f"{field.name} applies only to {owners}, not {self.name}")
    if isinstance(classes, str):
      raise CorpusError(f"classes must be a sequence of names, got the string {classes!r}")
    path = Path(os.path.abspath(os.path.expanduser(root)))
    if not path.exists():
      raise CorpusError(f"data.root '{path}' does not exist")

    candidates, skipped = self.lister(path, options)
    if not candidates:
      detail = (
        f"; {len(skipped)} files did not parse, e.g. {_describe(skipped[0])}" if skipped else ""
      )
      raise CorpusError(f"no {self.name} corpus at '{path}': expected {self.layout}{detail}")
    _check_unique_ids(candidates)

    available = self.classes or tuple(sorted({u.label for u in candidates}))
    chosen = _choose_classes(
      self.name, tuple(classes) or self.default_classes or available, available
    )
    if options.merge_excited and "excitement" in chosen:
      raise CorpusError(
        "class 'excitement' cannot be chosen with merge_excited, which relabels it happiness"
      )

    selected = []
    for utt in candidates:
      if utt.label not in chosen:
        continue
      problem = _audio_problem(Path(utt.path))
      if problem:
        skipped.append(Skipped(utt.path, problem))
      else:
        selected.append(utt)
    skipped.sort(key=lambda s: (s.path, s.reason))
    corpus = Corpus(
      name=self.name,
      class_names=chosen,
      utterances=tuple(sorted(selected, key=lambda u: u.utt_id)),
      skipped=tuple(skipped),
    )
    empty = [name for name, count in corpus.class_counts().items() if count == 0]
    if empty:
      detail = (
        f"; {len(skipped)} files were skipped, e.g. {_describe(skipped[0])}" if skipped else ""
      )
      raise CorpusError(f"class '{empty[0]}' has no utterances in {self.name} at '{path}'{detail}")
    return corpus


def _describe(skip: Skipped) -> str:
  return f"{skip.path}: {skip.reason}"


def _check_unique_ids(utterances: Sequence[Utterance]) -> None:
  seen: dict[str, str] = {}
  for utt in utterances:
    if utt.utt_id in seen:
      raise CorpusError(
        f"utterance id '{utt.utt_id}' appears twice: {seen[utt.utt_id]} and {utt.path}"
      )
    seen[utt.utt_id] = utt.path


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


def _audio_problem(path: Path) -> str | None:
  """Why an audio file cannot be used, or None if it can."""
  if not path.is_file():
    return "audio file missing"
  if path.stat().st_size == 0:
    return "empty file (0 bytes)"
  return None


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


# EmoDB: 03a01Fa.wav = speaker 03, sentence a01, emotion F, version a.
_EMODB_NAME = re.compile(r"^(\d{2})([a-z]\d{2})([A-Z])([a-z])$")
_EMODB_EMOTIONS = {
  "W": "anger",
  "L": "boredom",
  "E": "disgust",
  "A": "fear",
  "F": "happiness",
  "T": "sadness",
  "N": "neutral",
}


def _list_emodb(root: Path, options: _Options) -> tuple[list[Utterance], list[Skipped]]:
  del options
  folder = root / "wav" if (root / "wav").is_dir() else root
  utterances, skipped = [], []
  for path in _wav_files(folder, recursive=False):
    match = _EMODB_NAME.match(path.stem)
    if not match:
      skipped.append(Skipped(str(path), "name does not match the EmoDB pattern (e.g. 03a01Fa.wav)"))
      continue
    speaker, _, code, _ = match.groups()
    if code not in _EMODB_EMOTIONS:
      skipped.append(Skipped(str(path), _unknown_code("emotion letter", code, _EMODB_EMOTIONS)))
      continue
    utterances.append(Utterance(path.stem, str(path), _EMODB_EMOTIONS[code], speaker, speaker))
  return utterances, skipped


# RAVDESS: modality-channel-emotion-intensity-statement-repetition-actor.
_RAVDESS_NAME = re.compile(r"^(\d{2})-(\d{2})-(\d{2})-(\d{2})-(\d{2})-(\d{2})-(\d{2})$")
_RAVDESS_AUDIO_ONLY, _RAVDESS_SPEECH = "03", "01"
_RAVDESS_EMOTIONS = {
  "01": "neutral",
  "02": "calm",
  "03": "happiness",
  "04": "sadness",
  "05": "anger",
  "06": "fear",
  "07": "disgust",
  "08": "surprise",
}


def _list_ravdess(root: Path, options: _Options) -> tuple[list[Utterance], list[Skipped]]:
  del options
  utterances, skipped = [], []
  for path in _wav_files(root, recursive=True):
    match = _RAVDESS_NAME.match(path.stem)
    if not match:
      skipped.append(
        Skipped(
          str(path), "name does not match the RAVDESS pattern (e.g. 03-01-05-01-02-01-12.wav)"
        )
      )
      continue
    modality, channel, code, *_, actor = match.groups()
    # Song and audio-visual recordings are other tasks, not errors.
    if modality != _RAVDESS_AUDIO_ONLY or channel != _RAVDESS_SPEECH:
      continue
    if code not in _RAVDESS_EMOTIONS:
      skipped.append(Skipped(str(path), _unknown_code("emotion code", code, _RAVDESS_EMOTIONS)))
      continue
    speaker = f"Actor_{actor}"
    utterances.append(Utterance(path.stem, str(path), _RAVDESS_EMOTIONS[code], speaker, speaker))
  return utterances, skipped


# CREMA-D: actor_sentence_emotion_level, e.g. 1001_DFA_ANG_XX.
_CREMA_D_NAME = re.compile(r"^(\d+)_([A-Z]+)_([A-Z]+)_([A-Z]+)$", re.IGNORECASE)
_CREMA_D_EMOTIONS = {
  "ANG": "anger",
  "DIS": "disgust",
  "FEA": "fear",
  "HAP": "happiness",
  "NEU": "neutral",
  "SAD": "sadness",
}


def _list_crema_d(root: Path, options: _Options) -> tuple[list[Utterance], list[Skipped]]:
  del options
  folder = root / "AudioWAV" if (root / "AudioWAV").is_dir() else root
  utterances, skipped = [], []
  for path in _wav_files(folder, recursive=False):
    match = _CREMA_D_NAME.match(path.stem)
    if not match:
      skipped.append(
        Skipped(str(path), "name does not match the CREMA-D pattern (e.g. 1001_DFA_ANG_XX.wav)")
      )
      continue
    actor, _, code, _ = match.groups()
    if code.upper() not in _CREMA_D_EMOTIONS:
      skipped.append(Skipped(str(path), _unknown_code("emotion code", code, _CREMA_D_EMOTIONS)))
      continue
    utterances.append(
      Utterance(path.stem, str(path), _CREMA_D_EMOTIONS[code.upper()], actor, actor)
    )
  return utterances, skipped


# TESS: <speaker>_<word>_<emotion>.wav; releases differ in letter case.
_TESS_SPEAKERS = ("OAF", "YAF")
_TESS_EMOTIONS = {
  "angry": "anger",
  "disgust": "disgust",
  "fear": "fear",
  "happy": "happiness",
  "neutral": "neutral",
  "ps": "surprise",
  "sad": "sadness",
}


def _list_tess(root: Path, options: _Options) -> tuple[list[Utterance], list[Skipped]]:
  del options
  utterances, skipped = [], []
  for path in _wav_files(root, recursive=True):
    parts = path.stem.split("_")
    speaker = parts[0].upper()
    if len(parts) < 3 or speaker not in _TESS_SPEAKERS:
      skipped.append(
        Skipped(str(path), "name does not match the TESS pattern (e.g. OAF_back_angry.wav)")
      )
      continue
    code = parts[-1].lower()
    if code not in _TESS_EMOTIONS:
      skipped.append(Skipped(str(path), _unknown_code("emotion", code, _TESS_EMOTIONS)))
      continue
    utterances.append(Utterance(path.stem, str(path), _TESS_EMOTIONS[code], speaker, speaker))
  return utterances, skipped


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
  folder = manifest.parent
  utterances, skipped = [], []
  with open(manifest, newline="", encoding="utf-8") as f:
    rows = csv.DictReader(f)
    columns = rows.fieldnames or []
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
  return utterances, skipped


CORPORA: Mapping[str, Reader] = {
  reader.name: reader
  for reader in (
    Reader(
      name="crema_d",
      layout="AudioWAV/<actor>_<sentence>_<EMO>_<level>.wav files (e.g. 1001_DFA_ANG_XX.wav)",
      classes=_classes_of(_CREMA_D_EMOTIONS),
      default_classes=DEFAULT_CLASSES,
      lister=_list_crema_d,
    ),
    Reader(
      name="csv",
      layout=f"a CSV manifest (or a folder with {_CSV_MANIFEST}) with path and label columns and at least one row",
      classes=(),
      default_classes=(),
      lister=_list_csv,
    ),
    Reader(
      name="demo",
      layout=f"a demo corpus folder with {_CSV_MANIFEST} and at least one row",
      classes=(),
      default_classes=DEFAULT_CLASSES,
      lister=_list_csv,
    ),
    Reader(
      name="emodb",
      layout="wav/<speaker><sentence><emotion><version>.wav files (e.g. wav/03a01Fa.wav)",
      classes=_classes_of(_EMODB_EMOTIONS),
      default_classes=DEFAULT_CLASSES,
      lister=_list_emodb,
    ),
    Reader(
      name="iemocap",
      layout=(
        f"{_IEMOCAP_RELEASE}/Session1..5/dialog/EmoEvaluation/<dialog>.txt label files "
        "with audio in SessionN/sentences/wav/<dialog>/<utterance>.wav"
      ),
      classes=_classes_of(_IEMOCAP_CODES),
      default_classes=DEFAULT_CLASSES,
      lister=_list_iemocap,
      options=("include_scripted", "merge_excited"),
    ),
    Reader(
      name="ravdess",
      layout="Actor_XX/03-01-EE-II-SS-RR-AA.wav files (audio-only speech)",
      classes=_classes_of(_RAVDESS_EMOTIONS),
      default_classes=DEFAULT_CLASSES,
      lister=_list_ravdess,
    ),
    Reader(
      name="tess",
      layout="<folder>/<OAF|YAF>_<word>_<emotion>.wav files (e.g. OAF_angry/OAF_back_angry.wav)",
      classes=_classes_of(_TESS_EMOTIONS),
      default_classes=DEFAULT_CLASSES,
      lister=_list_tess,
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
  *,
  include_scripted: bool = False,
  merge_excited: bool = False,
) -> Corpus:
  """Lists corpus `name` at `root`, keeping `classes` (the corpus's defaults if empty)."""
  return _reader(name)(
    root, classes, include_scripted=include_scripted, merge_excited=merge_excited
  )
