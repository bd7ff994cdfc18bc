"""The runs-comparison table and the run figures, on hand-written and freshly trained runs."""

from __future__ import annotations

import dataclasses
import json
import math
import pathlib

import numpy as np
import pytest
from helpers import run_module
from matplotlib import image
from test_predict import trained_run

from ser_jax import plots, results, run_results
from ser_jax.report import main

_CLASSES = ["neutral", "happiness", "sadness", "anger"]


def _fold(fold: int, score: int) -> run_results.FoldResults:
  """A fold of 50 utterances per class whose WA, UA and macro F1 all equal `score` (even):
  each class right score/2 times and otherwise predicted as the next class."""
  right = score // 2
  counts = np.zeros((len(_CLASSES), len(_CLASSES)), dtype=int)
  for k in range(len(_CLASSES)):
    counts[k, k], counts[k, (k + 1) % len(_CLASSES)] = right, 50 - right
  return run_results.FoldResults(fold, 800, 200, counts)


def _member(fold_scores, gamma: float = 0.0, seed: int = 0) -> run_results.MemberResults:
  folds = [_fold(k, score) for k, score in enumerate(fold_scores)]
  return run_results.MemberResults(gamma, seed, 1e-3, (), folds)


def _summary(kind: str, loss: str, gamma: float, fold_scores) -> run_results.RunResults:
  """A run whose WA, UA and macro F1 in fold k are fold_scores[k]; its member's gamma is 0
  with softmax, as ser_jax.engine.members_of gives it."""
  return run_results.RunResults(
    class_names=_CLASSES,
    members=[_member(fold_scores, gamma if loss == "focal" else 0.0)],
    config={
      "data": {"corpus": "iemocap"},
      "features": {"kind": kind},
      "loss": {"name": loss, "gamma": gamma},
      "train": {"learning_rate": 1e-3},
      "cv": {"scheme": "stratified"},
    },
    num_params=1000,
    feature_store="/nowhere",
    wall_seconds=1.0,
  )


def _mean_sd(scores) -> str:
  return f"{np.mean(scores):.2f} +/- {np.std(scores):.2f}"


def _write_run(folder: pathlib.Path, results: run_results.RunResults, records=()) -> pathlib.Path:
  folder.mkdir(parents=True)
  run_results.write(folder, results)
  (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
  return folder


def _records(n_folds: int, n_epochs: int, n_members: int = 1) -> list[dict]:
  return [
    {
      "fold": fold,
      "epoch": epoch,
      "step": 10 * epoch,
      "train_loss": [1.0 / (epoch + fold + m) for m in range(n_members)],
      "train_accuracy": [30.0 + 5 * epoch + fold + m for m in range(n_members)],
      "seconds": 1.0,
    }
    for fold in range(n_folds)
    for epoch in range(1, n_epochs + 1)
  ]


# Each run's fold scores (WA = UA = macro F1).
_SCORES = {
  "logmel_softmax": [58, 62, 60, 64, 66],
  "mfcc_focal": [64, 66, 68, 66, 64, 66, 68, 70, 66, 62],
  "mfcc_softmax": [62, 66, 64, 60, 68],
}


def _sweep_summary() -> run_results.RunResults:
  """Gammas 0, 1, 2 by seeds 0, 1 at one learning rate, in two folds: WA mean 50 + 2 gamma
  + 4 seed over folds, sd 2 + 2 seed."""
  members = [
    _member([48 + 2 * gamma + 2 * seed, 52 + 2 * gamma + 6 * seed], gamma, seed)
    for gamma in (0, 1, 2)
    for seed in (0, 1)
  ]
  return dataclasses.replace(_summary("logmel", "focal", 0.0, [50, 50]), members=members)


@pytest.fixture
def runs(tmp_path: pathlib.Path) -> dict[str, pathlib.Path]:
  return {
    "logmel_softmax": _write_run(
      tmp_path / "logmel_softmax",
      _summary("logmel", "softmax", 2.0, _SCORES["logmel_softmax"]),
      _records(5, 3),
    ),
    "mfcc_focal": _write_run(
      tmp_path / "mfcc_focal", _summary("mfcc", "focal", 2.0, _SCORES["mfcc_focal"])
    ),
    "mfcc_softmax": _write_run(
      tmp_path / "mfcc_softmax", _summary("mfcc", "softmax", 0.0, _SCORES["mfcc_softmax"])
    ),
    "sweep": _write_run(tmp_path / "sweep", _sweep_summary(), _records(2, 4, n_members=6)),
  }


def _table_rows(text: str) -> list[list[str]]:
  lines = text.strip().splitlines()
  assert lines[0].startswith("| Input | Loss | WA (%) | UA (%) | Macro F1 (%) | Folds | Corpus")
  return [[cell.strip() for cell in line.strip("|").split("|")] for line in lines[2:]]


def test_the_command_line_takes_run_dirs_as_arguments(runs, capsys) -> None:
  """`python -m ser_jax.report RUN_DIR...` prints what main([RUN_DIR...]) returns."""
  names = [str(runs["mfcc_focal"]), str(runs["sweep"])]
  assert main(names) == 0
  expected = capsys.readouterr().out
  done = run_module("ser_jax.report", names)
  assert done.returncode == 0, done.stderr
  assert done.stdout == expected and expected.startswith("| Input | Loss |")
  wrong = run_module("ser_jax.report", [*names, "--json"])
  assert wrong.returncode == 1 and "--json goes with --compare" in wrong.stderr


def test_a_usage_error_is_one_line(runs, capsys) -> None:
  with pytest.raises(SystemExit) as exit_status:
    main([str(runs["mfcc_focal"]), "--json"])
  assert exit_status.value.code == 2
  assert capsys.readouterr().err == "error: --json goes with --compare\n"
  with pytest.raises(SystemExit):
    main(["--resamples=0", "--compare", str(runs["sweep"])])
  assert capsys.readouterr().err.startswith("error: flag --resamples=0: 0 is not a positive")


def test_table_rows_sorted_with_numbers(runs, tmp_path, capsys) -> None:
  names = ["logmel_softmax", "mfcc_focal", "mfcc_softmax"]
  missing = tmp_path / "unfinished"
  missing.mkdir()
  assert main([str(runs[n]) for n in names] + [str(missing)]) == 1  # The rest still print.
  captured = capsys.readouterr()
  assert captured.err.count("error:") == 1
  assert str(missing) in captured.err and "results.json" in captured.err
  rows = _table_rows(captured.out)
  # WA, UA and macro F1 are equal in every fold of these runs.
  assert rows == [
    ["MFCC", "Softmax", *[_mean_sd(_SCORES["mfcc_softmax"])] * 3, "5", "iemocap"]
    + [str(runs["mfcc_softmax"])],
    ["MFCC", "Focal (gamma=2)", *[_mean_sd(_SCORES["mfcc_focal"])] * 3, "10", "iemocap"]
    + [str(runs["mfcc_focal"])],
    ["Log-mel", "Softmax", *[_mean_sd(_SCORES["logmel_softmax"])] * 3, "5", "iemocap"]
    + [str(runs["logmel_softmax"])],
  ]


def test_a_run_with_folds_still_to_train_says_so(tmp_path, capsys) -> None:
  """Folds 0 and 2 finished of 5 (cv.folds): the report's folds and results.md's title."""
  scores = _summary("mfcc", "focal", 2.0, [60, 64, 62])
  folds = [
    dataclasses.replace(f, fold=k) for f, k in zip(scores.members[0].folds[:2], (0, 2), strict=True)
  ]
  partial = dataclasses.replace(
    scores, members=[dataclasses.replace(scores.members[0], folds=folds)], n_folds=5
  )
  assert main([str(_write_run(tmp_path / "partial", partial))]) == 0
  assert _table_rows(capsys.readouterr().out)[0][5] == "2 of 5"
  title = results.results_markdown(partial).splitlines()[0]
  assert title.endswith("5-fold stratified cross-validation (finished: fold 0, 2)"), title
  assert results.final_line(partial).startswith("Result over 2 of 5 folds: WA ")
  assert results.final_line(scores).startswith("Result over 3 folds: WA ")
  whole = dataclasses.replace(scores, n_folds=3)
  assert (
    results.results_markdown(whole).splitlines()[0].endswith("3-fold stratified cross-validation")
  )


def test_sweep_rows_average_seeds(runs, capsys) -> None:
  assert main([str(runs["sweep"])]) == 0
  rows = _table_rows(capsys.readouterr().out)
  assert [r[1] for r in rows] == ["Softmax", "Focal (gamma=1)", "Focal (gamma=2)"]
  # gamma=1: seed means 52 and 56 with fold stds 2 and 4 pool to sqrt((4 + 16) / 2 + 4).
  assert rows[1][2] == f"54.00 +/- {math.sqrt(14):.2f}"
  # UA and macro F1 pool the same way (every member keeps its folds); here they equal WA.
  assert rows[1][3] == rows[1][4] == rows[1][2]


def test_no_readable_run(tmp_path, capsys) -> None:
  broken = tmp_path / "broken"
  broken.mkdir()
  (broken / "results.json").write_text("{not json")
  assert main([str(tmp_path / "absent"), str(broken)]) == 1
  captured = capsys.readouterr()
  assert captured.out == ""
  assert "absent" in captured.err and "unreadable" in captured.err
  assert "no readable run" in captured.err


def _check_png(path: pathlib.Path) -> None:
  pixels = image.imread(path)
  assert pixels.ndim == 3 and pixels.shape[0] > 100 and pixels.shape[1] > 100
  assert pixels[..., :3].std() > 0.01, f"{path} is blank"


def test_figures(runs, capsys) -> None:
  assert main(["--figures", str(runs["logmel_softmax"]), str(runs["sweep"])]) == 0
  for name in ("confusion.png", "learning_curves.png"):
    _check_png(runs["logmel_softmax"] / name)
  assert not (runs["logmel_softmax"] / "sweep.png").exists()
  for name in ("confusion.png", "learning_curves.png", "sweep.png"):
    _check_png(runs["sweep"] / name)
  # Atomic writes leave no temporary files behind.
  assert sorted(p.name for p in runs["sweep"].iterdir()) == [
    "confusion.png",
    "learning_curves.png",
    "metrics.jsonl",
    "results.json",
    "sweep.png",
  ]


def test_sweep_points_with_two_learning_rates() -> None:
  members = [
    dataclasses.replace(member, learning_rate=rate)
    for member in _sweep_summary().members
    for rate in (1e-3, 3e-4)
  ]
  points = plots.sweep_points(members)
  assert list(points) == [(3e-4, ()), (1e-3, ())]
  np.testing.assert_allclose(points[1e-3, ()]["gamma"], [0.0, 1.0, 2.0])
  np.testing.assert_allclose(points[1e-3, ()]["wa_fold_mean"], [52.0, 54.0, 56.0])


def test_class_weights_are_curves_of_their_own_not_seeds(tmp_path, capsys) -> None:
  """configs/focal_claim.py's shape: gammas 0 and 2, with and without inverse-frequency
  weights; member 0 (gamma 0, no weights) heads results.md."""
  members = [_member([score, score], gamma) for gamma, score in ((0.0, 50), (2.0, 60))] + [
    dataclasses.replace(_member([score, score], gamma), alpha="inverse_frequency")
    for gamma, score in ((0.0, 70), (2.0, 90))
  ]
  sweep = dataclasses.replace(_summary("mfcc", "focal", 2.0, [50, 50]), members=members)
  points = plots.sweep_points(members)
  assert list(points) == [(1e-3, ()), (1e-3, "inverse_frequency")]
  np.testing.assert_allclose(points[1e-3, ()]["wa_fold_mean"], [50, 60])
  np.testing.assert_allclose(points[1e-3, "inverse_frequency"]["wa_fold_mean"], [70, 90])
  np.testing.assert_allclose(points[1e-3, "inverse_frequency"]["wa_fold_std"], [0, 0])
  assert main([str(_write_run(tmp_path / "sweep", sweep))]) == 0
  rows = _table_rows(capsys.readouterr().out)
  assert [(r[1], r[2]) for r in rows] == [
    ("Softmax, no class weights", "50.00 +/- 0.00"),
    ("Softmax, inverse_frequency weights", "70.00 +/- 0.00"),
    ("Focal (gamma=2), no class weights", "60.00 +/- 0.00"),
    ("Focal (gamma=2), inverse_frequency weights", "90.00 +/- 0.00"),
  ]
  text = results.results_markdown(sweep)
  assert "| MFCC | Softmax (member 0 of 4: every member below) | 50.00 +/- 0.00 |" in text
  assert "| 2.0 | 0 | 0.001 | inverse_frequency weights | 90.00 +/- 0.00 |" in text
  assert "member 0 (Softmax)" in results.final_line(sweep)


def test_confusion_shape_checked() -> None:
  with pytest.raises(ValueError, match="shape"):
    dataclasses.replace(_summary("mfcc", "focal", 2.0, [50, 50]), class_names=_CLASSES[:3])


def test_trained_run(tmp_path_factory, capsys) -> None:
  run = trained_run(tmp_path_factory)
  model = run_results.read(run).members[0]
  assert main(["--figures", str(run)]) == 0
  (row,) = _table_rows(capsys.readouterr().out)
  wa = f"{model.wa_fold_mean:.2f} +/- {model.wa_fold_std:.2f}"
  assert row[:3] == ["MFCC", "Focal (gamma=2)", wa]
  assert row[5:7] == ["2", "demo"]
  for name in ("confusion.png", "learning_curves.png"):
    _check_png(run / name)


def test_learning_curves_of_a_chunked_sweep_read_the_chunk_holding_the_member():
  """Chunks log their own members (first_member); member 3 lives in the chunk from 2."""
  records = []
  for first, n in ((0, 2), (2, 2), (4, 1)):
    for epoch in (1, 2):
      records.append(
        {
          "fold": 0,
          "first_member": first,
          "epoch": epoch,
          "train_loss": [10.0 * (first + k) + epoch for k in range(n)],
          "train_accuracy": [float(first + k) for k in range(n)],
        }
      )
  records.append({**records[3], "train_loss": [99.0, 98.0]})  # A resumed epoch: later wins.
  points = plots.learning_curve_points(records, member=3)
  assert points == {
    0: {
      1: {"train_loss": 31.0, "train_accuracy": 3.0},
      2: {"train_loss": 98.0, "train_accuracy": 3.0},
    }
  }
  assert plots.learning_curve_points(records, member=4)[0][2]["train_loss"] == 42.0
  assert plots.learning_curve_points(records, member=5) == {}
