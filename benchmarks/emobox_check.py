"""Checks a run on an EmoBox corpus against EmoBox's own files, independently of ser_jax.

python benchmarks/emobox_check.py RUN_DIR EMOBOX_DATASET_FOLDER

For a run with every class of the corpus (--config.data.classes='()'), for each fold:
whether its test utterances (predictions.csv) are exactly those of
EmoBox's `<dataset>_test_fold_<k>.jsonl` (read here with json), less the skips the run lists;
and WA, UA, micro and macro F1 recomputed with scikit-learn from predictions.csv beside the
run's results.json (layout 2, read as JSON; its micro F1 is WA). Exits 1 on any difference.
"""

from __future__ import annotations

import csv
import json
import math
import pathlib
import sys

from sklearn import metrics

SCORES = {
  "wa": metrics.accuracy_score,
  "ua": metrics.balanced_accuracy_score,
  "micro_f1": lambda y, p: metrics.f1_score(y, p, average="micro"),
  "macro_f1": lambda y, p: metrics.f1_score(y, p, average="macro"),
}


# results.json gives no micro F1: with one label per utterance it equals WA.
WRITTEN_AS = {"micro_f1": "wa"}


def main(run: pathlib.Path, root: pathlib.Path) -> int:
  summary = json.loads((run / "results.json").read_text())
  model = summary["members"][0]
  with open(run / "predictions.csv", newline="") as f:
    rows = [r for r in csv.DictReader(f) if r["member"] == "0"]
  skipped_paths = {s["path"] for s in summary["skipped_files"]}
  metadata = [json.loads(line) for line in (root / f"{root.name}.jsonl").open() if line.strip()]
  # A skipped file's path ends with its wav path less downloads/<dataset>/ (data.audio_root).
  prefix = f"downloads/{root.name}/"
  skipped_keys = {
    r["key"]
    for r in metadata
    if any(p.endswith("/" + r["wav"].removeprefix(prefix)) for p in skipped_paths)
  }
  ok = True
  for fold in model["folds"]:
    name = fold["given_fold"]["name"]
    listed = {
      json.loads(line)["key"]
      for line in (root / name / f"{root.name}_test_{name}.jsonl").open()
      if line.strip()
    }
    tested = [r for r in rows if r["fold"] == str(fold["fold"])]
    same = sorted(r["utt_id"] for r in tested) == sorted(listed - skipped_keys)
    scores = {
      k: 100 * score([r["label"] for r in tested], [r["predicted"] for r in tested])
      for k, score in SCORES.items()
    }
    agree = all(math.isclose(scores[k], fold[WRITTEN_AS.get(k, k)], abs_tol=1e-9) for k in SCORES)
    ok &= same and agree
    print(
      f"{name}: {len(tested)} tested, EmoBox lists {len(listed)} ({len(listed & skipped_keys)} "
      f"skipped): {'the same' if same else 'DIFFERENT'}; scikit-learn "
      + ", ".join(f"{k} {v:.2f}" for k, v in scores.items())
      + f": {'equal to' if agree else 'DIFFERENT from'} results.json"
    )
  pooled = {
    k: 100 * score([r["label"] for r in rows], [r["predicted"] for r in rows])
    for k, score in SCORES.items()
  }
  agree = all(
    math.isclose(pooled[k], model[f"{WRITTEN_AS.get(k, k)}_pooled"], abs_tol=1e-9) for k in SCORES
  )
  ok &= agree
  print(
    f"pooled over {len(rows)}: "
    + ", ".join(f"{k} {v:.2f}" for k, v in pooled.items())
    + f": {'equal to' if agree else 'DIFFERENT from'} results.json"
  )
  return 0 if ok else 1


if __name__ == "__main__":
  if len(sys.argv) != 3:
    sys.exit(__doc__.splitlines()[2])
  sys.exit(main(pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])))
