"""results.json's contract: scores derived from counts agree with scikit-learn, the file
round-trips, the old layout (no schema_version) still reads, and errors name the file."""

from __future__ import annotations

import csv
import json
import pathlib

import numpy as np
import pytest
from sklearn import metrics as skm

from ser_jax import run_results
from ser_jax.run_results import FoldResults, GivenFold, MemberResults, RunResults

_CLASSES = ("neutral", "happiness", "sadness", "anger")
_LABELS = list(range(len(_CLASSES)))
_CONFIG = {
  "seed": 3,
  "data": {"corpus": "iemocap", "root": ""},
  "features": {"kind": "mfcc"},
  "loss": {"name": "focal", "gamma": 2.0, "alpha": []},
  "train": {"learning_rate": 1e-3},
  "cv": {"scheme": "session"},
}


def _fold_predictions(seed: int, n_folds: int = 3):
  """[(labels, predictions)] per fold: mostly right; fold 1 has no 'anger' at all and
  predicts no 'sadness', so macro F1 leaves a class out and counts another as 0."""
  rng = np.random.default_rng(seed)
  out = []
  for fold in range(n_folds):
    n = 30 + 7 * fold
    labels = rng.integers(0, len(_CLASSES), n)
    predictions = np.where(rng.random(n) < 0.6, labels, rng.integers(0, len(_CLASSES), n))
    if fold == 1:
      labels = np.where(labels == 3, 0, labels)
      predictions = np.where(predictions >= 2, 1, predictions)
    out.append((labels, predictions))
  return out


def _member(seed: int, gamma: float = 2.0, given: bool = False) -> MemberResults:
  folds = [
    FoldResults(
      fold=k,
      n_train=200 + k,
      n_test=len(labels),
      confusion_counts=skm.confusion_matrix(labels, predictions, labels=_LABELS),
      given_fold=GivenFold(f"fold_{k + 1}", 10 + k) if given else None,
    )
    for k, (labels, predictions) in enumerate(_fold_predictions(seed))
  ]
  return MemberResults(gamma=gamma, seed=seed, learning_rate=1e-3, alpha=(), folds=folds)


def _run(n_members: int = 1, given: bool = False) -> RunResults:
  return RunResults(
    class_names=_CLASSES,
    members=[_member(k, gamma=float(k), given=given) for k in range(n_members)],
    config=_CONFIG,
    num_params=1234,
    feature_store="/stores/abc",
    skipped_files=[{"path": "/a.wav", "reason": "too short"}],
    class_counts={"corpus": {"neutral": 10}, "used": {"neutral": 10}},
    provenance={"jax": "0.10.2", "lowering": "xla"},
    wall_seconds=12.5,
    n_folds=3,
  )


# Derived scores against scikit-learn -----------------------------------------------------------


@pytest.mark.parametrize("seed", range(4))
def test_fold_scores_are_scikit_learns(seed):
  member = _member(seed)
  for fold, (labels, predictions) in zip(member.folds, _fold_predictions(seed), strict=True):
    assert fold.wa == pytest.approx(100 * skm.accuracy_score(labels, predictions))
    assert fold.ua == pytest.approx(100 * skm.balanced_accuracy_score(labels, predictions))
    assert fold.macro_f1 == pytest.approx(
      100 * skm.f1_score(labels, predictions, average="macro", zero_division=0)
    )


@pytest.mark.parametrize("seed", range(4))
def test_member_scores_are_scikit_learns_over_folds_and_pooled(seed):
  member = _member(seed)
  pairs = _fold_predictions(seed)
  for name, score in (
    ("wa", skm.accuracy_score),
    ("ua", skm.balanced_accuracy_score),
    ("macro_f1", lambda y, p: skm.f1_score(y, p, average="macro", zero_division=0)),
  ):
    per_fold = [100 * score(labels, predictions) for labels, predictions in pairs]
    assert getattr(member, f"{name}_fold_mean") == pytest.approx(np.mean(per_fold))
    assert getattr(member, f"{name}_fold_std") == pytest.approx(np.std(per_fold))
    labels, predictions = (np.concatenate(x) for x in zip(*pairs, strict=True))
    assert getattr(member, f"{name}_pooled") == pytest.approx(100 * score(labels, predictions))
  labels, predictions = (np.concatenate(x) for x in zip(*pairs, strict=True))
  np.testing.assert_array_equal(
    member.confusion_counts_pooled, skm.confusion_matrix(labels, predictions, labels=_LABELS)
  )
  np.testing.assert_allclose(
    member.confusion_matrix_pooled,
    100 * skm.confusion_matrix(labels, predictions, labels=_LABELS, normalize="true"),
  )
  np.testing.assert_allclose(
    member.per_class_recall_pooled,
    100 * skm.recall_score(labels, predictions, labels=_LABELS, average=None),
  )
  assert member.n_test_pooled == len(labels)


# Layout 2 -----------------------------------------------------------------------------------------


def test_write_then_read_gives_the_same_results(tmp_path):
  for n_members, given in ((1, True), (3, False)):
    results = _run(n_members, given)
    workdir = tmp_path / f"run_{n_members}"
    workdir.mkdir()
    run_results.write(workdir, results)
    assert run_results.read(workdir) == results
    assert RunResults.from_json(json.loads(json.dumps(results.to_json()))) == results
    assert not [p for p in workdir.iterdir() if p.name != "results.json"]  # Atomic: no leftovers.


def test_the_file_writes_every_score_out_for_every_member(tmp_path):
  results = _run(3, given=True)
  run_results.write(tmp_path, results)
  document = json.loads((tmp_path / "results.json").read_text())
  assert document["schema_version"] == 2
  assert document["class_names"] == list(_CLASSES)
  assert len(document["members"]) == 3
  for written, member in zip(document["members"], results.members, strict=True):
    assert written["gamma"] == member.gamma and written["alpha"] == []
    for name in ("wa", "ua", "macro_f1"):
      for over in ("fold_mean", "fold_std", "pooled"):
        assert written[f"{name}_{over}"] == getattr(member, f"{name}_{over}")
    assert written["n_test_pooled"] == member.n_test_pooled
    assert written["confusion_counts_pooled"] == member.confusion_counts_pooled.tolist()
    assert list(written["per_class_recall_pooled"]) == list(_CLASSES)
    assert len(written["folds"]) == 3
    for fold, expected in zip(written["folds"], member.folds, strict=True):
      assert fold["wa"] == expected.wa and fold["macro_f1"] == expected.macro_f1
      assert fold["given_fold"] == {"name": expected.given_fold.name, "n_valid": 10 + fold["fold"]}
  assert "micro_f1_pooled" not in document["members"][0]


# Layout 1 (no schema_version) ------------------------------------------------------------------


def _v1_scores(counts: np.ndarray) -> dict:
  """overall_accuracy, class_accuracy, macro_f1 as the old layout wrote them, by hand."""
  recall = np.diag(counts) / np.maximum(counts.sum(1), 1)
  return {
    "overall_accuracy": 100 * np.trace(counts) / counts.sum(),
    "class_accuracy": 100 * recall[counts.sum(1) > 0].mean(),
    "macro_f1": 0.0,  # Not read back: scores follow from the counts.
  }


def _v1_document(members: list[MemberResults], sweep: bool) -> dict:
  """results.json as ser_jax wrote it before schema_version: member 0 at the top level,
  its folds with counts and sizes, and a sweep's members as WA/UA means only."""
  first = members[0]
  folds = []
  for fold in first.folds:
    counts = np.array(fold.confusion_counts)
    folds.append(
      {
        "fold": fold.fold,
        "n_train": fold.n_train,
        "n_test": fold.n_test,
        **_v1_scores(counts),
        "emobox_scores": {"wa": 0.0, "ua": 0.0, "micro_f1": 0.0, "macro_f1": 0.0},
        "confusion_counts": counts.tolist(),
      }
    )
  document = {
    "class_names": list(_CLASSES),
    "overall_accuracy": first.wa_fold_mean,
    "overall_accuracy_std": first.wa_fold_std,
    "class_accuracy": first.ua_fold_mean,
    "class_accuracy_std": first.ua_fold_std,
    "macro_f1": 0.0,
    "macro_f1_std": 0.0,
    "wa_fold_mean": first.wa_fold_mean,
    "micro_f1_pooled": first.wa_pooled,
    "n_test_pooled": first.n_test_pooled,
    "per_class_recall": {},
    "confusion_counts": first.confusion_counts_pooled.tolist(),
    "confusion_matrix": first.confusion_matrix_pooled.tolist(),
    "folds": folds,
    "num_params": 1234,
    "feature_store": "/stores/abc",
    "skipped_files": [],
    "class_counts": {"used": {"neutral": 10}},
    "provenance": {"jax": "0.4.35"},
    "config": _CONFIG,
    "wall_seconds": 3.0,
  }
  if sweep:
    document["sweep"] = [
      {
        "gamma": m.gamma,
        "seed": m.seed,
        "learning_rate": m.learning_rate,
        "alpha": [],
        "overall_accuracy": m.wa_fold_mean,
        "overall_accuracy_std": m.wa_fold_std,
        "class_accuracy": m.ua_fold_mean,
        "class_accuracy_std": m.ua_fold_std,
      }
      for m in members
    ]
  return document


def _write_predictions(workdir: pathlib.Path, n_members: int) -> None:
  """predictions.csv of members 0..n-1 (member k's predictions those of _member(k))."""
  rows = []
  for k in range(n_members):
    for fold, (labels, predictions) in enumerate(_fold_predictions(k)):
      for i, (label, predicted) in enumerate(zip(labels, predictions, strict=True)):
        p = np.full(len(_CLASSES), 0.1)
        p[predicted] = 0.7
        rows.append([f"u{fold}_{i}", "spk", fold, k, _CLASSES[label], _CLASSES[predicted], *p])
  with open(workdir / "predictions.csv", "w", newline="") as f:
    writer = csv.writer(f)
    writer.writerow(
      ["utt_id", "speaker", "fold", "member", "label", "predicted"]
      + [f"p_{name}" for name in _CLASSES]
    )
    writer.writerows(rows)


def test_an_old_single_run_reads_from_its_folds_and_config(tmp_path):
  member = _member(0)
  (tmp_path / "results.json").write_text(json.dumps(_v1_document([member], sweep=False)))
  results = run_results.read(tmp_path)
  (model,) = results.members
  assert [f.confusion_counts for f in model.folds] == [f.confusion_counts for f in member.folds]
  assert [(f.n_train, f.n_test) for f in model.folds] == [
    (f.n_train, f.n_test) for f in member.folds
  ]
  # The hyper-parameters of a single run are its config's.
  assert (model.gamma, model.seed, model.learning_rate, model.alpha) == (2.0, 3, 1e-3, ())
  assert results.class_names == _CLASSES and results.provenance == {"jax": "0.4.35"}
  assert results.num_params == 1234 and results.wall_seconds == 3.0
  assert model.wa_fold_mean == pytest.approx(member.wa_fold_mean)


def test_an_old_sweep_rebuilds_its_members_from_predictions_csv(tmp_path):
  members = [_member(k, gamma=float(k)) for k in range(3)]
  (tmp_path / "results.json").write_text(json.dumps(_v1_document(members, sweep=True)))
  _write_predictions(tmp_path, 3)
  results = run_results.read(tmp_path)
  assert [m.gamma for m in results.members] == [0.0, 1.0, 2.0]
  for k, member in enumerate(results.members):
    pairs = _fold_predictions(k)
    for fold, (labels, predictions) in zip(member.folds, pairs, strict=True):
      np.testing.assert_array_equal(
        fold.confusion_counts, skm.confusion_matrix(labels, predictions, labels=_LABELS)
      )
      assert fold.n_test == len(labels)
      assert fold.n_train == 200 + fold.fold  # Member 0's: every member trains on its folds.
    old = _v1_document(members, sweep=True)["sweep"][k]
    assert member.wa_fold_mean == pytest.approx(old["overall_accuracy"])
    assert member.ua_fold_std == pytest.approx(old["class_accuracy_std"])


def test_an_old_sweep_without_predictions_csv_says_so(tmp_path):
  members = [_member(k) for k in range(2)]
  (tmp_path / "results.json").write_text(json.dumps(_v1_document(members, sweep=True)))
  with pytest.raises(run_results.ResultsError, match="predictions.csv: missing") as error:
    run_results.read(tmp_path)
  assert str(tmp_path / "predictions.csv") in str(error.value)
  assert "old layout" in str(error.value)


# Errors ------------------------------------------------------------------------------------------


def test_errors_name_the_file_and_what_is_wrong(tmp_path):
  path = tmp_path / "results.json"
  with pytest.raises(run_results.ResultsError, match="does not exist") as error:
    run_results.read(tmp_path)
  assert str(path) in str(error.value)
  path.write_text("{not json")
  with pytest.raises(run_results.ResultsError, match="unreadable") as error:
    run_results.read(tmp_path)
  assert str(path) in str(error.value)
  document = _run().to_json()
  del document["members"][0]["folds"][1]["confusion_counts"]
  path.write_text(json.dumps(document))
  with pytest.raises(run_results.ResultsError, match="missing key 'confusion_counts'") as error:
    run_results.read(tmp_path)
  assert str(path) in str(error.value)
  path.write_text(json.dumps({**_run().to_json(), "schema_version": 7}))
  with pytest.raises(run_results.ResultsError, match="schema_version 7"):
    run_results.read(tmp_path)


def test_counts_that_disagree_with_the_sizes_or_classes_are_refused():
  fold = _member(0).folds[0]
  with pytest.raises(ValueError, match="sum to 30, but n_test is 31"):
    FoldResults(fold.fold, fold.n_train, fold.n_test + 1, fold.confusion_counts)
  with pytest.raises(ValueError, match="shape"):
    RunResults(_CLASSES[:3], [_member(0)], _CONFIG)
