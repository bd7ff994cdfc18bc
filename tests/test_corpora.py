"""Corpus readers on small fixtures in each corpus's on-disk layout, and on the real EmoDB."""

from __future__ import annotations

import logging
import os
import pathlib

import numpy as np
import pytest
import soundfile as sf
from helpers import run_module

from ser_jax import io_utils, run_data
from ser_jax.config import default_config
from ser_jax.data import info
from ser_jax.data.corpora import CORPORA, available_classes, read_corpus
from ser_jax.data.corpus import CorpusError

EMODB_ROOT = pathlib.Path(
  os.environ.get(
    "SER_JAX_EMODB", pathlib.Path(__file__).resolve().parents[2] / "shared" / "data" / "emodb"
  )
)
PAPER_CLASSES = ("neutral", "happiness", "sadness", "anger")
APPLEDOUBLE = b"\x00\x05\x16\x07\x00\x02\x00\x00Mac OS X        \x00\x02\xff\xfe[junk]\tSes\n"


def _wav(path: pathlib.Path, *, empty: bool = False) -> None:
  """Writes 0.1 s of 16 kHz noise (or a zero-byte file) at `path`."""
  path.parent.mkdir(parents=True, exist_ok=True)
  if empty:
    path.write_bytes(b"")
    return
  noise = np.random.default_rng(len(path.name)).normal(0.0, 0.1, 1600).astype(np.float32)
  sf.write(path, noise, 16000, subtype="PCM_16")


def _labels(corpus) -> dict[str, str]:
  return {u.utt_id: u.label for u in corpus.utterances}


def _reasons(corpus) -> dict[str, str]:
  return {pathlib.Path(s.path).name: s.reason for s in corpus.skipped}


# --- EmoDB ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def emodb(tmp_path_factory) -> pathlib.Path:
  root = tmp_path_factory.mktemp("emodb")
  for name in [
    "03a01Fa",  # happiness
    "03a01Nc",  # neutral
    "03a01Wa",  # anger
    "03a02Ta",  # sadness
    "03b01La",  # boredom
    "08a01Ea",  # disgust
    "08a02Fb",
    "08a04Nb",
    "08a05Wa",
    "08b10Tc",
  ]:
    _wav(root / "wav" / f"{name}.wav")
  _wav(root / "wav" / "09a01Fa.wav", empty=True)
  _wav(root / "wav" / "03a01Xa.wav")  # no emotion X
  _wav(root / "wav" / "notes.wav")
  (root / "wav" / "._03a01Fa.wav").write_bytes(APPLEDOUBLE)
  (root / "wav" / "readme.txt").write_text("not audio\n")
  return root


def test_emodb_paper_classes(emodb):
  corpus = read_corpus("emodb", emodb, PAPER_CLASSES)
  assert corpus.name == "emodb"
  assert corpus.class_names == PAPER_CLASSES
  assert _labels(corpus) == {
    "03a01Fa": "happiness",
    "03a01Nc": "neutral",
    "03a01Wa": "anger",
    "03a02Ta": "sadness",
    "08a02Fb": "happiness",
    "08a04Nb": "neutral",
    "08a05Wa": "anger",
    "08b10Tc": "sadness",
  }
  ids = [u.utt_id for u in corpus.utterances]
  assert ids == sorted(ids)
  assert {(u.speaker, u.group) for u in corpus.utterances} == {("03", "03"), ("08", "08")}
  assert all(os.path.isabs(u.path) and os.path.isfile(u.path) for u in corpus.utterances)
  assert _reasons(corpus) == {
    "03a01Xa.wav": "unknown emotion letter 'X'; expected one of: A, E, F, L, N, T, W",
    "09a01Fa.wav": "empty file (0 bytes)",
    "notes.wav": "name does not match the EmoDB pattern (e.g. 03a01Fa.wav)",
  }


def test_no_classes_asked_for_is_every_class_the_corpus_has_in_the_readers_order(emodb):
  corpus = read_corpus("emodb", emodb)  # The fixture has no fear (A) file.
  assert corpus.class_names == ("neutral", "happiness", "sadness", "anger", "boredom", "disgust")
  assert corpus.class_counts()["disgust"] == 1 and "fear" not in corpus.class_counts()


def test_emodb_class_selection_and_order(emodb):
  corpus = read_corpus("emodb", emodb / "wav", ["disgust", "anger", "boredom"])
  assert corpus.class_names == ("disgust", "anger", "boredom")
  assert corpus.class_counts() == {"disgust": 1, "anger": 2, "boredom": 1}
  assert corpus.label_indices() == [1, 2, 0, 1]  # 03a01Wa 03b01La 08a01Ea 08a05Wa
  # A skipped zero-byte happiness file is no concern when happiness is not chosen.
  assert "09a01Fa.wav" not in _reasons(corpus)


def test_emodb_class_errors(emodb):
  with pytest.raises(
    CorpusError, match=r"unknown class 'happy' for emodb; expected one of: .*happi"
  ):
    read_corpus("emodb", emodb, ["happy", "anger"])
  with pytest.raises(CorpusError, match=r"class 'fear' has no utterances in emodb"):
    read_corpus("emodb", emodb, ["anger", "fear"])
  with pytest.raises(CorpusError, match=r"class 'anger' is listed twice"):
    read_corpus("emodb", emodb, ["anger", "neutral", "anger"])
  with pytest.raises(CorpusError, match=r"sequence of names, got the string 'anger'"):
    read_corpus("emodb", emodb, "anger")
  with pytest.raises(CorpusError, match=r"include_scripted applies only to iemocap, not emodb"):
    read_corpus("emodb", emodb, include_scripted=True)


# --- IEMOCAP -------------------------------------------------------------------------------------

HEADER = "% [START_TIME - END_TIME] TURN_NAME EMOTION [V, A, D]\n\n"
CATEGORIES = {
  "neu": "Neutral",
  "ang": "Anger",
  "hap": "Happiness",
  "sad": "Sadness",
  "exc": "Excited",
  "fru": "Frustration",
  "xxx": "Other",
}


def _block(start: float, turn: str, code: str) -> str:
  word = CATEGORIES[code]
  return (
    f"[{start:.4f} - {start + 2.1:.4f}]\t{turn}\t{code}\t[2.5000, 3.0000, 2.5000]\n"
    f"C-E2:\t{word};\t()\n"
    f"C-E3:\t{word}; Neutral;\t()\n"
    f"C-{turn[-4]}1:\t{word};\t()\n"
    "A-E3:\tval 3; act 2; dom  2;\t()\n"
    f"A-{turn[-4]}1:\tval 3; act 3; dom  3;\t()\n\n"
  )


def _dialog(root: pathlib.Path, session: int, dialog: str, turns, *, bad_block: str = "") -> None:
  """Writes a dialog's EmoEvaluation file and its sentence wavs (turns: (index, code, audio))."""
  release = root / "IEMOCAP_full_release" / f"Session{session}"
  text = HEADER
  for i, (turn, code, audio) in enumerate(turns):
    text += _block(6.29 + 5 * i, f"{dialog}_{turn}", code)
    if audio:
      _wav(release / "sentences" / "wav" / dialog / f"{dialog}_{turn}.wav", empty=audio == "empty")
  text += bad_block
  labels = release / "dialog" / "EmoEvaluation"
  labels.mkdir(parents=True, exist_ok=True)
  (labels / f"{dialog}.txt").write_text(text)


BAD_BLOCK = "[99.1000 - ]\tSes01F_impro01_F009 neu\nC-E2:\tNeutral;\t()\n\n"


@pytest.fixture(scope="module")
def iemocap(tmp_path_factory) -> pathlib.Path:
  root = tmp_path_factory.mktemp("iemocap")
  _dialog(
    root,
    1,
    "Ses01F_impro01",
    [
      ("F000", "neu", True),
      ("M000", "ang", True),
      ("F001", "xxx", True),
      ("M001", "exc", True),
      ("F002", "hap", True),
      ("M002", "sad", True),
      ("F003", "fru", True),
      ("M003", "neu", False),
    ],
    bad_block=BAD_BLOCK,
  )
  _dialog(root, 1, "Ses01F_script01_1b", [("M007", "sad", True), ("F003", "ang", True)])
  _dialog(root, 3, "Ses03M_impro05a", [("F012", "neu", True), ("M000", "hap", True)])
  _dialog(
    root,
    3,
    "Ses03M_impro05b",
    [("F000", "sad", True), ("M001", "ang", True), ("M002", "neu", "empty")],
  )
  labels = root / "IEMOCAP_full_release" / "Session1" / "dialog" / "EmoEvaluation"
  (labels / "._Ses01F_impro01.txt").write_bytes(APPLEDOUBLE)
  # Per-evaluator files: read as dialog files they would relabel F000 and duplicate it.
  for sub, name in [("Categorical", "Ses01F_impro01_e2_cat"), ("Attribute", "Ses01F_impro01_e3")]:
    (labels / sub).mkdir()
    (labels / sub / f"{name}.txt").write_text(
      "[6.2900 - 8.3900]\tSes01F_impro01_F000\tang\t[1.0000, 5.0000, 5.0000]\n"
      "Ses01F_impro01_F000 :Anger; ()\n"
    )
  return root


IMPROVISED = {
  "Ses01F_impro01_F000": "neutral",
  "Ses01F_impro01_M000": "anger",
  "Ses01F_impro01_F002": "happiness",
  "Ses01F_impro01_M002": "sadness",
  "Ses03M_impro05a_F012": "neutral",
  "Ses03M_impro05a_M000": "happiness",
  "Ses03M_impro05b_F000": "sadness",
  "Ses03M_impro05b_M001": "anger",
}


@pytest.mark.parametrize("sub", ["", "IEMOCAP_full_release"])
def test_iemocap_improvised_four_classes(iemocap, sub):
  corpus = read_corpus("iemocap", iemocap / sub, PAPER_CLASSES)
  assert corpus.class_names == PAPER_CLASSES
  assert _labels(corpus) == IMPROVISED
  release = iemocap / "IEMOCAP_full_release"
  utt = corpus.utterances[0]
  assert utt.path == str(release / "Session1/sentences/wav/Ses01F_impro01/Ses01F_impro01_F000.wav")
  reasons = {(pathlib.Path(s.path).name, s.reason) for s in corpus.skipped}
  labels = release / "Session1/dialog/EmoEvaluation/Ses01F_impro01.txt"
  bad_line = labels.read_text().splitlines().index(BAD_BLOCK.splitlines()[0]) + 1
  assert reasons == {
    ("Ses01F_impro01_M003.wav", "audio file missing"),
    ("Ses03M_impro05b_M002.wav", "empty file (0 bytes)"),
    (
      "Ses01F_impro01.txt",
      f"Ses01F_impro01.txt:{bad_line}: cannot parse label line {BAD_BLOCK.splitlines()[0]!r}",
    ),
  }


def test_iemocap_speakers_and_sessions(iemocap):
  corpus = read_corpus("iemocap", iemocap, PAPER_CLASSES, include_scripted=True)
  speakers = {u.utt_id: (u.speaker, u.group) for u in corpus.utterances}
  # The letter after SesNN names the dialog's first speaker; the turn's own letter is the speaker.
  assert speakers["Ses01F_impro01_M000"] == ("Ses01_M", "Session1")
  assert speakers["Ses01F_impro01_F000"] == ("Ses01_F", "Session1")
  assert speakers["Ses03M_impro05a_F012"] == ("Ses03_F", "Session3")
  assert speakers["Ses03M_impro05b_M001"] == ("Ses03_M", "Session3")
  assert speakers["Ses01F_script01_1b_M007"] == ("Ses01_M", "Session1")
  assert {s for s, _ in speakers.values()} == {"Ses01_F", "Ses01_M", "Ses03_F", "Ses03_M"}


def test_iemocap_include_scripted_and_merge_excited(iemocap):
  scripted = read_corpus("iemocap", iemocap, PAPER_CLASSES, include_scripted=True)
  assert _labels(scripted) == {
    **IMPROVISED,
    "Ses01F_script01_1b_M007": "sadness",
    "Ses01F_script01_1b_F003": "anger",
  }
  merged = read_corpus("iemocap", iemocap, PAPER_CLASSES, merge_excited=True)
  assert _labels(merged) == {**IMPROVISED, "Ses01F_impro01_M001": "happiness"}
  both = read_corpus("iemocap", iemocap, PAPER_CLASSES, include_scripted=True, merge_excited=True)
  assert len(both.utterances) == len(IMPROVISED) + 3
  assert both.class_counts() == {"neutral": 2, "happiness": 3, "sadness": 3, "anger": 3}


def test_iemocap_other_classes(iemocap):
  corpus = read_corpus("iemocap", iemocap, ["frustration", "excitement"])
  assert _labels(corpus) == {
    "Ses01F_impro01_F003": "frustration",
    "Ses01F_impro01_M001": "excitement",
  }
  assert len(available_classes("iemocap")) == 10
  with pytest.raises(CorpusError, match="'excitement' cannot be chosen with merge_excited"):
    read_corpus("iemocap", iemocap, ["excitement", "anger"], merge_excited=True)
  with pytest.raises(CorpusError, match=r"class 'surprise' has no utterances in iemocap"):
    read_corpus("iemocap", iemocap, ["anger", "surprise"])


# --- RAVDESS, CREMA-D, TESS ----------------------------------------------------------------------


def test_ravdess(tmp_path):
  for rel in [
    "Actor_01/03-01-05-01-01-01-01.wav",
    "Actor_01/03-01-01-01-01-01-01.wav",
    "Actor_01/03-01-02-02-01-02-01.wav",
    "Actor_02/03-01-03-02-01-01-02.wav",
    "Actor_02/03-01-04-01-02-01-02.wav",
    "Actor_02/03-02-05-01-01-01-02.wav",  # song: another task, not an error
    "Actor_02/01-01-05-01-01-01-02.wav",  # audio-visual
    "Actor_02/03-01-09-01-01-01-02.wav",
    "Actor_02/take2.wav",
  ]:
    _wav(tmp_path / "Audio_Speech_Actors_01-24" / rel)
  corpus = read_corpus("ravdess", tmp_path, PAPER_CLASSES)
  assert _labels(corpus) == {
    "03-01-01-01-01-01-01": "neutral",
    "03-01-03-02-01-01-02": "happiness",
    "03-01-04-01-02-01-02": "sadness",
    "03-01-05-01-01-01-01": "anger",
  }
  assert {u.speaker for u in corpus.utterances} == {"Actor_01", "Actor_02"}
  assert all(u.group == u.speaker for u in corpus.utterances)
  assert set(_reasons(corpus)) == {"03-01-09-01-01-01-02.wav", "take2.wav"}
  calm = read_corpus("ravdess", tmp_path, ["calm", "anger"])
  assert calm.class_counts() == {"calm": 1, "anger": 1}


def test_crema_d(tmp_path):
  for name in ["1001_DFA_ANG_XX", "1001_IEO_HAP_HI", "1002_DFA_NEU_XX", "1002_ITS_SAD_LO"]:
    _wav(tmp_path / "AudioWAV" / f"{name}.wav")
  _wav(tmp_path / "AudioWAV" / "1002_DFA_FEA_XX.wav")
  _wav(tmp_path / "AudioWAV" / "1003_DFA_SAD_XX.wav", empty=True)
  _wav(tmp_path / "AudioWAV" / "1003_DFA_BOR_XX.wav")
  for root in [tmp_path, tmp_path / "AudioWAV"]:
    corpus = read_corpus("crema_d", root, PAPER_CLASSES)
    assert _labels(corpus) == {
      "1001_DFA_ANG_XX": "anger",
      "1001_IEO_HAP_HI": "happiness",
      "1002_DFA_NEU_XX": "neutral",
      "1002_ITS_SAD_LO": "sadness",
    }
    assert [u.speaker for u in corpus.utterances] == ["1001", "1001", "1002", "1002"]
    assert _reasons(corpus) == {
      "1003_DFA_BOR_XX.wav": "unknown emotion code 'BOR'; expected one of: "
      "ANG, DIS, FEA, HAP, NEU, SAD",
      "1003_DFA_SAD_XX.wav": "empty file (0 bytes)",
    }
  assert read_corpus("crema_d", tmp_path, ["fear"]).class_counts() == {"fear": 1}


def test_tess(tmp_path):
  for rel in [
    "OAF_angry/OAF_back_angry.wav",
    "OAF_Fear/OAF_back_Fear.wav",
    "OAF_happy/OAF_back_happy.wav",
    "OAF_Sad/OAF_bean_Sad.wav",
    "YAF_neutral/YAF_back_neutral.wav",
    "YAF_pleasant_surprised/YAF_back_ps.wav",
    "YAF_disgust/YAF_back_disgust.wav",
    "yaf_happy/yaf_dog_happy.wav",
    "YAF_angry/YAF_back_cross.wav",
  ]:
    _wav(tmp_path / "TESS Toronto emotional speech set data" / rel)
  corpus = read_corpus("tess", tmp_path, PAPER_CLASSES)
  assert _labels(corpus) == {
    "OAF_back_angry": "anger",
    "OAF_back_happy": "happiness",
    "OAF_bean_Sad": "sadness",
    "YAF_back_neutral": "neutral",
    "yaf_dog_happy": "happiness",
  }
  assert {u.speaker for u in corpus.utterances} == {"OAF", "YAF"}
  assert set(_reasons(corpus)) == {"YAF_back_cross.wav"}
  extra = read_corpus("tess", tmp_path, ["surprise", "fear", "disgust"])
  assert _labels(extra) == {
    "OAF_back_Fear": "fear",
    "YAF_back_ps": "surprise",
    "YAF_back_disgust": "disgust",
  }


# Each reader of file names on a small tree, every file's fate written out here: (class,
# speaker) where it is listed, the reason where it is skipped, None where it is left out
# (another task, or a folder the reader does not search).
FILE_FATES = {
  "emodb": {
    "wav/03a01Fa.wav": ("happiness", "03"),
    "wav/16b10Tb.wav": ("sadness", "16"),
    "wav/03a01Xa.wav": "unknown emotion letter 'X'; expected one of: A, E, F, L, N, T, W",
    "wav/3a01Fa.wav": "name does not match the EmoDB pattern (e.g. 03a01Fa.wav)",
    "wav/03A01Fa.wav": "name does not match the EmoDB pattern (e.g. 03a01Fa.wav)",
    "wav/sub/08a01Wa.wav": None,
  },
  "ravdess": {
    "Actor_01/03-01-05-01-01-01-01.wav": ("anger", "Actor_01"),
    "Actor_12/03-01-02-02-02-02-12.wav": ("calm", "Actor_12"),
    "Actor_12/more/03-01-08-01-01-01-12.wav": ("surprise", "Actor_12"),
    "Actor_02/03-02-05-01-01-01-02.wav": None,  # Song.
    "Actor_02/02-01-05-01-01-01-02.wav": None,  # Video only.
    "Actor_02/03-01-09-01-01-01-02.wav": (
      "unknown emotion code '09'; expected one of: 01, 02, 03, 04, 05, 06, 07, 08"
    ),
    "Actor_02/03-01-05-01-01-01.wav": (
      "name does not match the RAVDESS pattern (e.g. 03-01-05-01-02-01-12.wav)"
    ),
  },
  "crema_d": {
    "AudioWAV/1001_DFA_ANG_XX.wav": ("anger", "1001"),
    "AudioWAV/1091_ieo_hap_hi.wav": ("happiness", "1091"),
    "AudioWAV/1002_DFA_bor_XX.wav": (
      "unknown emotion code 'BOR'; expected one of: ANG, DIS, FEA, HAP, NEU, SAD"
    ),
    "AudioWAV/1002_DFA_XX.wav": (
      "name does not match the CREMA-D pattern (e.g. 1001_DFA_ANG_XX.wav)"
    ),
    "AudioWAV/more/1003_DFA_SAD_XX.wav": None,
  },
  "tess": {
    "OAF_angry/OAF_back_angry.wav": ("anger", "OAF"),
    "yaf_fear/yaf_chalk_Fear.wav": ("fear", "YAF"),
    "YAF_pleasant_surprised/YAF_a_b_ps.wav": ("surprise", "YAF"),
    "OAF_sad/OAF_sad.wav": "name does not match the TESS pattern (e.g. OAF_back_angry.wav)",
    "MAF_angry/MAF_back_angry.wav": (
      "name does not match the TESS pattern (e.g. OAF_back_angry.wav)"
    ),
    "OAF_cross/OAF_back_Cross.wav": (
      "unknown emotion 'cross'; expected one of: angry, disgust, fear, happy, neutral, ps, sad"
    ),
  },
}


@pytest.mark.parametrize("name", sorted(FILE_FATES))
def test_readers_of_file_names_list_each_file_as_written_here(name, tmp_path):
  fates = FILE_FATES[name]
  for rel in fates:
    _wav(tmp_path / rel)
  listed = {rel: fate for rel, fate in fates.items() if isinstance(fate, tuple)}
  corpus = read_corpus(name, tmp_path, sorted({label for label, _ in listed.values()}))
  assert {
    os.path.relpath(u.path, tmp_path): (u.label, u.speaker) for u in corpus.utterances
  } == listed
  assert all(
    u.group == u.speaker and u.utt_id == pathlib.Path(u.path).stem for u in corpus.utterances
  )
  assert {os.path.relpath(s.path, tmp_path): s.reason for s in corpus.skipped} == {
    rel: fate for rel, fate in fates.items() if isinstance(fate, str)
  }


# --- csv and demo --------------------------------------------------------------------------------


def test_csv_manifest(tmp_path):
  for rel in ["clips/a1.wav", "clips/a2.wav", "clips/b1.wav"]:
    _wav(tmp_path / rel)
  manifest = tmp_path / "manifest.csv"
  manifest.write_text(
    "path,label,speaker\n"
    "clips/a1.wav,loud,s1\n"
    "clips/a2.wav,quiet,\n"
    "clips/b1.wav,loud,s2\n"
    "clips/gone.wav,quiet,s2\n"
    ",quiet,s3\n"
  )
  for root in [tmp_path, manifest]:
    corpus = read_corpus("csv", root)
    assert corpus.class_names == ("loud", "quiet")
    assert [(u.utt_id, u.label, u.speaker, u.group) for u in corpus.utterances] == [
      ("clips/a1", "loud", "s1", "s1"),
      ("clips/a2", "quiet", "unknown", "unknown"),
      ("clips/b1", "loud", "s2", "s2"),
    ]
    assert corpus.utterances[0].path == str(tmp_path / "clips" / "a1.wav")
    assert _reasons(corpus) == {
      "gone.wav": "audio file missing",
      "manifest.csv": "manifest.csv:6: empty path or label",
    }
  assert read_corpus("csv", manifest, ["quiet"]).class_counts() == {"quiet": 1}
  with pytest.raises(
    CorpusError, match=r"unknown class 'anger' for csv; expected one of: loud, quiet"
  ):
    read_corpus("csv", manifest, ["anger"])


def test_csv_errors(tmp_path):
  manifest = tmp_path / "list.csv"
  manifest.write_text("path,emotion\nx.wav,anger\n")
  with pytest.raises(CorpusError, match=r"list.csv' has no 'label' column; columns: path, emotion"):
    read_corpus("csv", manifest)
  with pytest.raises(CorpusError, match=r"expected a CSV file or a folder containing manifest.csv"):
    read_corpus("csv", tmp_path)


def test_csv_as_spreadsheets_write_it(tmp_path):
  """A byte-order mark and spaces after the header's commas are not part of column names."""
  for rel in ["a.wav", "b.wav"]:
    _wav(tmp_path / rel)
  manifest = tmp_path / "manifest.csv"
  manifest.write_bytes(
    "path, label , speaker\r\na.wav, anger,s1\r\nb.wav,neutral,s2\r\n".encode("utf-8-sig")
  )
  assert manifest.read_bytes().startswith(b"\xef\xbb\xbf")
  corpus = read_corpus("csv", manifest)
  assert [(u.utt_id, u.label, u.speaker) for u in corpus.utterances] == [
    ("a", "anger", "s1"),
    ("b", "neutral", "s2"),
  ]


def test_csv_labels_left_out_are_counted_and_near_misses_warned(tmp_path, caplog):
  rows = ["path,label"]
  for i, label in enumerate(["anger", "Anger", "neutral", "neutrl", "anger ", "fear", "fear"]):
    _wav(tmp_path / f"c{i}.wav")
    rows.append(f"c{i}.wav,{label}")
  (tmp_path / "manifest.csv").write_text("\n".join(rows) + "\n")
  with caplog.at_level("WARNING"):
    corpus = read_corpus("csv", tmp_path, ["neutral", "anger"])
  assert corpus.class_counts() == {"neutral": 1, "anger": 2}  # Values are stripped.
  assert corpus.left_out == (("Anger", 1), ("fear", 2), ("neutrl", 1))
  warnings = [r.getMessage() for r in caplog.records]
  assert warnings == [
    "csv: 1 utterances labelled 'Anger' are left out: the class is 'anger' (labels must match "
    "exactly)"
  ]
  assert "left out, labels not among the classes: Anger 1, fear 2, neutrl 1" in (
    info.format_summary(corpus)
  )
  caplog.clear()
  with caplog.at_level("WARNING"):
    read_corpus("csv", tmp_path)  # Every label a class.
  assert ["differ only in letter case" in r.getMessage() for r in caplog.records] == [True]


def test_csv_listing_a_file_twice_is_an_error(tmp_path):
  _wav(tmp_path / "a.wav")
  _wav(tmp_path / "b.wav")
  (tmp_path / "manifest.csv").write_text(
    "utt_id,path,label\nx,a.wav,anger\ny,b.wav,neutral\nz,./a.wav,neutral\n"
  )
  with pytest.raises(CorpusError, match=r"a\.wav is listed twice, as 'x' and 'z'"):
    read_corpus("csv", tmp_path)


def test_demo_reads_manifest_with_paper_classes(tmp_path):
  rows = ["utt_id,path,label,speaker,group"]
  for i, label in enumerate([*PAPER_CLASSES, "boredom"]):
    _wav(tmp_path / "wav" / f"spk00_{i:04d}.wav")
    rows.append(f"spk00_{i:04d},wav/spk00_{i:04d}.wav,{label},spk00,spk00")
  (tmp_path / "manifest.csv").write_text("\n".join(rows) + "\n")
  corpus = read_corpus("demo", tmp_path)
  assert corpus.class_names == PAPER_CLASSES
  assert [u.utt_id for u in corpus.utterances] == [f"spk00_{i:04d}" for i in range(4)]


# --- registry and errors -------------------------------------------------------------------------


def test_registry():
  assert set(CORPORA) == {
    "crema_d",
    "csv",
    "demo",
    "emobox",
    "emodb",
    "iemocap",
    "ravdess",
    "tess",
  }
  assert available_classes("emodb") == (
    "neutral",
    "happiness",
    "sadness",
    "anger",
    "boredom",
    "disgust",
    "fear",
  )
  assert "calm" in available_classes("ravdess")
  assert "surprise" in available_classes("tess")
  assert available_classes("csv") == available_classes("emobox") == ()
  for name in ["crema_d", "emodb", "iemocap", "ravdess", "tess"]:
    assert set(PAPER_CLASSES) <= set(available_classes(name))
  with pytest.raises(
    CorpusError, match=r"unknown corpus 'iemocapp'; expected one of: crema_d, csv"
  ):
    read_corpus("iemocapp", ".")


def test_root_errors(tmp_path, emodb):
  with pytest.raises(CorpusError, match=r"data.root '.*/nowhere' does not exist"):
    read_corpus("emodb", tmp_path / "nowhere")
  with pytest.raises(CorpusError, match=r"no iemocap corpus at .*expected IEMOCAP_full_release/"):
    read_corpus("iemocap", emodb)
  with pytest.raises(CorpusError, match=r"no emodb corpus at .*expected wav/.*03a01Fa"):
    read_corpus("emodb", tmp_path)
  with pytest.raises(CorpusError, match=r"no ravdess corpus at .*expected Actor_XX/"):
    read_corpus("ravdess", emodb / "wav" / "03a01Fa.wav")
  _wav(tmp_path / "wav" / "1001_DFA_ANG_XX.wav")
  with pytest.raises(CorpusError, match=r"no emodb corpus .*1 files did not parse"):
    read_corpus("emodb", tmp_path)


# --- info ----------------------------------------------------------------------------------------


def test_info_prints_counts(emodb, capsys):
  assert info.main(["--corpus=emodb", f"--root={emodb}", "--classes=anger, boredom"]) == 0
  out = capsys.readouterr().out
  assert "corpus emodb: 3 utterances, 2 classes" in out
  assert [
    line.split()[:2] for line in out.splitlines() if line.startswith(("anger", "boredom"))
  ] == [
    ["anger", "2"],
    ["boredom", "1"],
  ]
  assert "2 speakers, 2 groups" in out
  assert "notes.wav: name does not match" in out


def test_info_lists_what_a_run_trains_on_unless_told_every_class(emodb, capsys):
  assert info.main(["--corpus=emodb", f"--root={emodb}"]) == 0
  assert "corpus emodb: 8 utterances, 4 classes" in capsys.readouterr().out
  assert info.main(["--corpus=emodb", f"--root={emodb}", "--classes="]) == 0
  assert "corpus emodb: 10 utterances, 6 classes"  # And boredom, disgust in capsys.readouterr().out


def test_info_on_the_command_line(emodb):
  done = run_module("ser_jax.data.info", ["--corpus=emodb", f"--root={emodb}", "--classes=anger"])
  assert done.returncode == 0, done.stderr
  assert "corpus emodb: 2 utterances, 1 classes" in done.stdout
  missing = run_module("ser_jax.data.info", ["--corpus=emodb"])
  assert missing.returncode == 2
  assert missing.stderr.strip() == (
    "error: flag --root=None: Flag --root must have a value other than None."
  )


def test_info_error_exit(emodb, capsys):
  assert info.main(["--corpus=emodb", f"--root={emodb}", "--classes=happy"]) == 2
  err = capsys.readouterr().err
  assert err.startswith("error: unknown class 'happy'") and err.count("\n") == 1


def test_iemocap_info_flags(iemocap, capsys):
  argv = ["--corpus=iemocap", f"--root={iemocap}", "--include_scripted", "--merge_excited"]
  assert info.main(argv) == 0
  assert "corpus iemocap: 11 utterances, 4 classes" in capsys.readouterr().out


# --- the real EmoDB ------------------------------------------------------------------------------

needs_emodb = pytest.mark.skipif(
  not (EMODB_ROOT / "wav").is_dir(),
  reason=f"EmoDB not found at {EMODB_ROOT} (set SER_JAX_EMODB to its folder)",
)


@needs_emodb
def test_real_emodb():
  full = read_corpus("emodb", EMODB_ROOT)  # No classes asked for: every one.
  assert len(full.utterances) == 535
  assert full.class_counts() == {
    "neutral": 79,
    "happiness": 71,
    "sadness": 62,
    "anger": 127,
    "boredom": 81,
    "disgust": 46,
    "fear": 69,
  }
  assert full.skipped == ()
  assert len({u.speaker for u in full.utterances}) == 10
  four = read_corpus("emodb", EMODB_ROOT, PAPER_CLASSES)
  assert len(four.utterances) == 339
  assert {u.speaker for u in four.utterances} == {
    "03",
    "08",
    "09",
    "10",
    "11",
    "12",
    "13",
    "14",
    "15",
    "16",
  }


def test_a_path_that_is_not_utf8_is_skipped_and_its_skip_recorded(tmp_path):
  root = tmp_path / "tess"
  for rel in ["OAF_happy/OAF_back_happy.wav", "YAF_neutral/YAF_back_neutral.wav"]:
    _wav(root / rel)
  odd_folder = root / os.fsdecode(b"OAF_angry\xe9")  # Latin-1 bytes, as an old archive may hold.
  odd_folder.mkdir()
  (odd_folder / "OAF_back_angry.wav").write_bytes(
    (root / "OAF_happy/OAF_back_happy.wav").read_bytes()
  )
  _wav(root / "YAF_angry/YAF_back_angry.wav")
  corpus = read_corpus("tess", root, ["neutral", "happiness", "anger"])
  assert _labels(corpus) == {
    "OAF_back_happy": "happiness",
    "YAF_back_neutral": "neutral",
    "YAF_back_angry": "anger",
  }
  (skip,) = [s for s in corpus.skipped if "angry" in s.path]
  assert "not UTF-8" in skip.reason
  io_utils.atomic_write_csv(
    tmp_path / "skipped.csv", ("path", "reason"), [(skip.path, skip.reason)]
  )
  assert "OAF_angry\\udce9" in (tmp_path / "skipped.csv").read_text(encoding="utf-8")


def test_a_runs_listing_logs_its_skipped_files_before_any_work(tmp_path, caplog):
  rows = ["path,label"]
  for i, label in enumerate(["neutral", "anger"] * 3):
    if i != 4:
      _wav(tmp_path / f"{i}.wav")
    rows.append(f"{i}.wav,{label}")
  (tmp_path / "manifest.csv").write_text("\n".join(rows) + "\n")
  config = default_config()
  config.data.corpus, config.data.root = "csv", str(tmp_path)
  config.data.classes = ("neutral", "anger")
  with caplog.at_level(logging.WARNING):
    corpus = run_data.load_corpus(config)
  assert len(corpus.utterances) == 5
  assert "1 file(s) of the csv listing skipped" in caplog.text
  assert f"{tmp_path / '4.wav'}: audio file missing" in caplog.text


def test_a_manifest_that_is_not_utf8_is_one_line_naming_it_and_the_line(tmp_path):
  _wav(tmp_path / "a.wav")
  manifest = tmp_path / "manifest.csv"
  manifest.write_bytes("path,label\na.wav,anger\nb.wav,col\u00e8re\n".encode("latin-1"))
  with pytest.raises(
    CorpusError, match=r"manifest '.*manifest\.csv' is not UTF-8 \(line 3, byte 10"
  ):
    read_corpus("csv", tmp_path)


def test_a_listing_whose_every_file_is_missing_says_so_before_naming_a_class(tmp_path):
  (tmp_path / "manifest.csv").write_text("path,label\na.wav,anger\nb.wav,neutral\n")
  with pytest.raises(
    CorpusError, match=r"no file of csv at .* could be used: 2 skipped, e.g. .*a\.wav"
  ):
    read_corpus("csv", tmp_path)
