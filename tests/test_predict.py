"""Prediction from a trained run: windows, ensembles, resampling, bad files and the CLI."""

from __future__ import annotations

import copy
import csv
import importlib.util
import json
import pathlib
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest
import soundfile as sf
from helpers import REPO, session_demo_corpus

from ser_jax import checkpoints, experiment, metrics, run_data
from ser_jax.predict import Predictor, PredictorError, main, window_starts

_RUNS: dict[str, pathlib.Path] = {}


def tiny_config():
  """The demo config shrunk to seconds: one epoch, two folds, a 4-channel ResNet, 1 s clips."""
  spec = importlib.util.spec_from_file_location("demo_config", REPO / "configs" / "demo.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config()
  config.train.num_epochs = 1
  config.cv.n_folds = 2
  config.model.name = "resnet10"
  config.model.width = 4
  config.features.max_seconds = 1.0
  config.data.num_workers = 1
  config.data.root = str(session_demo_corpus())
  return config


def trained_run(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
  """Trains the tiny run once per session; test_report reuses it through this function."""
  if "run" not in _RUNS:
    base = tmp_path_factory.mktemp("tiny_run")
    config = tiny_config()
    config.data.cache_dir = str(base / "cache")
    experiment.train_and_evaluate(config, str(base / "run"))
    _RUNS["run"] = base / "run"
    _RUNS["cache"] = base / "cache"
  return _RUNS["run"]


@pytest.fixture(scope="session")
def run(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
  return trained_run(tmp_path_factory)


@pytest.fixture(scope="session")
def predictor(run: pathlib.Path) -> Predictor:
  return Predictor.from_workdir(run)


def _tone(seconds: float, sample_rate: int, channels: int = 1) -> np.ndarray:
  """A gliding tone with noise, [n] or [n, channels]; each channel differs."""
  t = np.arange(int(round(seconds * sample_rate))) / sample_rate
  rng = np.random.default_rng(sample_rate)
  waves = [
    0.3 * np.sin(2 * np.pi * (180 + 40 * c) * t * (1 + 0.2 * t)) + 0.02 * rng.normal(size=t.size)
    for c in range(channels)
  ]
  return np.stack(waves, axis=1).astype(np.float32) if channels > 1 else waves[0].astype(np.float32)


@pytest.fixture(scope="module")
def audio_dir(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
  folder = tmp_path_factory.mktemp("audio")
  for seconds, rate, channels in [
    (0.3, 8000, 1),
    (1.0, 16000, 1),
    (4.0, 44100, 1),
    (2.5, 16000, 2),
  ]:
    name = f"{seconds}s_{rate}hz_{channels}ch"
    sf.write(folder / f"{name}.wav", _tone(seconds, rate, channels), rate, subtype="FLOAT")
  (folder / "nested").mkdir()
  sf.write(folder / "nested" / "clip.flac", _tone(1.5, 22050), 22050)
  (folder / "corrupt.wav").write_bytes(b"RIFF\x00\x00\x00\x00WAVEjunk")
  (folder / "empty.wav").write_bytes(b"")
  (folder / "notes.txt").write_text("not audio\n")
  return folder


def test_window_starts() -> None:
  assert window_starts(3, 4) == [0]
  assert window_starts(4, 4) == [0]
  assert window_starts(10, 4) == [0, 2, 4, 6]
  assert window_starts(9, 4) == [0, 2, 4, 5]


@pytest.mark.parametrize(
  "seconds, rate, channels, n_windows",
  [(0.3, 8000, 1, 1), (1.0, 16000, 1, 1), (4.0, 44100, 1, 7), (2.5, 16000, 2, 4)],
)
def test_probabilities_and_windows(
  predictor, audio_dir, seconds, rate, channels, n_windows
) -> None:
  result = predictor.predict_file(audio_dir / f"{seconds}s_{rate}hz_{channels}ch.wav", windows=True)
  probabilities = result["probabilities"]
  assert list(probabilities) == list(predictor.class_names)
  assert sum(probabilities.values()) == pytest.approx(1.0, abs=1e-5)
  assert result["label"] == max(probabilities, key=probabilities.get)
  windows = result["windows"]
  assert len(windows) == n_windows
  # Half-window hop on 1 s windows; the last window ends where the audio ends.
  starts = [w["start_seconds"] for w in windows]
  expected = [0.5 * k for k in range(n_windows - 1)] + [max(seconds - 1.0, 0.0)]
  assert starts == pytest.approx(expected, abs=1e-3)
  for window in windows:
    assert sum(window["probabilities"].values()) == pytest.approx(1.0, abs=1e-5)
  mean = np.mean([list(w["probabilities"].values()) for w in windows], axis=0)
  np.testing.assert_allclose(mean, list(probabilities.values()), rtol=1e-6)


def test_waveform_api_matches_file(predictor, audio_dir) -> None:
  stereo = _tone(2.5, 16000, 2)
  from_file = predictor.predict_file(audio_dir / "2.5s_16000hz_2ch.wav")["probabilities"]
  from_array = predictor.predict(stereo, 16000)
  np.testing.assert_allclose(list(from_array.values()), list(from_file.values()), rtol=1e-6)
  starts, _ = predictor.window_probabilities(stereo, 16000)
  assert starts.tolist() == pytest.approx([0.0, 0.5, 1.0, 1.5])
  # Stereo is mixed to mono before anything else.
  mono = predictor.predict(stereo.mean(axis=1), 16000)
  np.testing.assert_allclose(list(mono.values()), list(from_array.values()), rtol=1e-6)


def test_ensemble_is_mean_of_folds(run, predictor) -> None:
  assert predictor.folds == (0, 1)
  waveform = _tone(3.2, 16000)
  per_fold = [
    list(Predictor.from_workdir(run, fold=k).predict(waveform, 16000).values()) for k in (0, 1)
  ]
  ensemble = list(predictor.predict(waveform, 16000).values())
  np.testing.assert_allclose(ensemble, np.mean(per_fold, axis=0), rtol=1e-5)
  assert not np.allclose(per_fold[0], per_fold[1])


def test_first_window_reproduces_the_runs_test_predictions(run) -> None:
  """Fold 0's model on its test files, scored from the files as the command line scores
  them with --first_window, gives the probabilities and counts the run recorded."""
  config = tiny_config()
  config.data.cache_dir = str(_RUNS["cache"])
  store = run_data.prepare_store(config, progress=False)
  paths = {row["utt_id"]: row["path"] for row in store.manifest}
  with open(run / "fold_0" / "predictions.csv", newline="") as f:
    recorded = list(csv.DictReader(f))
  class_names = list(store.class_names)
  fold_predictor = Predictor.from_workdir(run, fold=0)
  predicted = []
  for row in recorded:
    result = fold_predictor.predict_file(paths[row["utt_id"]], first_window=True)
    want = [float(row[f"p_{name}"]) for name in class_names]
    np.testing.assert_allclose(list(result["probabilities"].values()), want, rtol=0, atol=1e-6)
    predicted.append(class_names.index(result["label"]))
  labels = [class_names.index(row["label"]) for row in recorded]
  counts = metrics.confusion_counts(np.array(labels), np.array(predicted), len(class_names))
  assert (
    counts.tolist()
    == json.loads((run / "fold_0" / "result.json").read_text())["confusion_counts"][0]
  )
  # The clips are longer than the run's: scored whole, each is several windows.
  whole = fold_predictor.predict_file(paths[recorded[0]["utt_id"]], windows=True)
  assert len(whole["windows"]) > 1


def test_bad_fold_and_member(run, tmp_path) -> None:
  with pytest.raises(PredictorError, match="fold 7"):
    Predictor.from_workdir(run, fold=7)
  with pytest.raises(PredictorError, match="member=1"):
    Predictor.from_workdir(run, member=1)
  with pytest.raises(PredictorError, match="config.json"):
    Predictor.from_workdir(tmp_path)


def test_sweep_member(run, tmp_path) -> None:
  """A two-member checkpoint: member 1 is member 0 with a large head bias towards class 0."""
  sweep = tmp_path / "sweep"
  shutil.copytree(run, sweep, ignore=shutil.ignore_patterns("checkpoints"))
  for fold in (0, 1):
    epoch = checkpoints.checkpoint_manager(run / f"fold_{fold}" / "checkpoints").latest_step()
    # As numpy arrays, which the shift below can modify.
    state = jax.tree.map(
      np.array, checkpoints.restore_variables(run / f"fold_{fold}" / "checkpoints")
    )
    shifted = copy.deepcopy(state)
    shifted["params"]["head"]["bias"][:, 0] += 50.0
    stacked = jax.tree.map(lambda a, b: np.concatenate([a, b]), state, shifted)
    target = checkpoints.checkpoint_manager(sweep / f"fold_{fold}" / "checkpoints")
    checkpoints.save(target, epoch, stacked)
    target.wait_until_finished()
  waveform = _tone(1.0, 16000)
  original = Predictor.from_workdir(run).predict(waveform, 16000)
  member_0 = Predictor.from_workdir(sweep, member=0).predict(waveform, 16000)
  member_1 = Predictor.from_workdir(sweep, member=1).predict(waveform, 16000)
  np.testing.assert_allclose(list(member_0.values()), list(original.values()), rtol=1e-6)
  assert member_1["neutral"] > 0.99
  with pytest.raises(PredictorError, match="member=2 is out of range.*2 member"):
    Predictor.from_workdir(sweep, member=2)


def test_cli(run, audio_dir) -> None:
  process = subprocess.run(
    [sys.executable, "-m", "ser_jax.predict", f"--workdir={run}", "--windows", str(audio_dir)],
    capture_output=True,
    text=True,
    cwd=REPO,
    check=False,
  )
  assert process.returncode == 1, process.stderr  # corrupt.wav and empty.wav: error lines.
  # Warnings and ser_jax's own lines only: no Orbax INFO lines for each fold's checkpoint.
  assert "checkpoint_manager" not in process.stderr, process.stderr
  lines = [json.loads(line) for line in process.stdout.splitlines()]
  by_name = {pathlib.Path(line["path"]).name: line for line in lines}
  assert sorted(by_name) == sorted(
    [
      "0.3s_8000hz_1ch.wav",
      "1.0s_16000hz_1ch.wav",
      "4.0s_44100hz_1ch.wav",
      "2.5s_16000hz_2ch.wav",
      "clip.flac",
      "corrupt.wav",
      "empty.wav",
    ]
  )
  assert "unreadable" in by_name["corrupt.wav"]["error"]
  assert "empty" in by_name["empty.wav"]["error"]
  scored = [line for line in lines if "error" not in line]
  assert len(scored) == 5
  for line in scored:
    assert line["label"] in line["probabilities"]
    assert len(line["windows"]) >= 1


def test_cli_exit_status(run, audio_dir, tmp_path, capsys) -> None:
  assert main([f"--workdir={run}", str(audio_dir / "corrupt.wav"), str(tmp_path / "gone.wav")]) == 1
  errors = [json.loads(line)["error"] for line in capsys.readouterr().out.splitlines()]
  assert len(errors) == 2 and "cannot open" in errors[1]
  assert main([f"--workdir={tmp_path}", str(audio_dir / "1.0s_16000hz_1ch.wav")]) == 2
  assert "config.json" in capsys.readouterr().err
