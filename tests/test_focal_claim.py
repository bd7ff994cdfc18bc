"""The paper's claim as the project tests it: a corpus resampled to IEMOCAP's class shares,
focal loss against softmax on the same folds, compared utterance by utterance."""

from __future__ import annotations

import json

import numpy as np
from helpers import run_module, tiny_args

from ser_jax import compare
from ser_jax.report import main as report

IEMOCAP_COUNTS = "(1099,284,608,289)"


def test_focal_against_softmax_at_iemocap_shares(tmp_path, capsys):
  cache = tmp_path / "cache"
  runs = {}
  for loss in ("softmax", "focal"):
    runs[loss] = tmp_path / loss
    args = tiny_args(runs[loss], cache, **{"loss.name": loss, "data.class_shares": IEMOCAP_COUNTS})
    done = run_module("ser_jax.main", args)
    assert done.returncode == 0, done.stderr
  summary = json.loads((runs["focal"] / "results.json").read_text())
  counts = summary["class_counts"]
  used = np.array(list(counts["used"].values()))
  # The largest subset at IEMOCAP's shares: each class within one utterance of its share,
  # and the limiting class kept whole.
  shares = np.array([1099, 284, 608, 289]) / 2280
  assert np.all(np.abs(used - used.sum() * shares) < 1)
  assert np.any(used == np.array(list(counts["corpus"].values())))
  assert sum(f["n_test"] for f in summary["folds"]) == used.sum()
  for run in runs.values():
    compare.check_consistent(run)  # results.json recomputed from predictions.csv.
  argv = ["--compare", str(runs["softmax"]), str(runs["focal"]), "--json", "--resamples", "500"]
  assert report(argv) == 0
  result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  assert result["n_utterances"] == used.sum()
  low, high = result["ua_difference_ci95"]
  assert low <= result["ua_difference"] <= high
  assert 0.0 <= result["ua_p_value"] <= 1.0 and 0.0 <= result["wa_p_value"] <= 1.0
  assert result["provenance_differences"] == {}
  per_fold = result["per_fold"]
  assert [f["n_test"] for f in per_fold] == [f["n_test"] for f in summary["folds"]]
