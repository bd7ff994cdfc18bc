"""The focal-loss claim on every corpus at hand, within and across corpora, in one study.

SER_JAX_DATA=/path/to/corpora python -m ser_jax.study --config=configs/focal_study.py \
  --workdir=runs/focal_study

Focal loss (gamma 2, the paper's) against softmax cross entropy (the reference) and
inverse-frequency weighted cross entropy, MFCC input, on each corpus resampled to IEMOCAP
improvised's class shares, with speaker-independent folds (min(5, speakers) per corpus),
then trained on each corpus and tested on every other. The corpora are read from
$SER_JAX_DATA: EmoDB in emodb/, CASIA's four classes through casia/manifest.csv. Without it,
give them with --config.study.corpora, e.g.
'("emodb=emodb:/data/emodb", "casia=csv:/data/casia/manifest.csv")'.
"""

import os
import pathlib

from ser_jax.study.compose import study_config

# IEMOCAP improvised, four classes: utterances per class (neutral, happiness, sadness, anger).
IEMOCAP_IMPROVISED_COUNTS = (1099, 284, 608, 289)


def get_config():
  config = study_config("configs/mfcc_focal.py")
  if data := os.environ.get("SER_JAX_DATA"):
    data = pathlib.Path(data)
    config.study.corpora = (
      f"emodb=emodb:{data / 'emodb'}",
      f"casia=csv:{data / 'casia' / 'manifest.csv'}",
    )
  config.study.settings = {
    "softmax": {"loss": {"name": "softmax"}},
    "focal": {"loss": {"name": "focal", "gamma": 2.0}},
    "weighted_ce": {"loss": {"name": "softmax", "alpha": "inverse_frequency"}},
  }
  config.study.reference = "softmax"
  config.study.cross_corpus = True
  config.data.class_shares = IEMOCAP_IMPROVISED_COUNTS
  config.cv.scheme = "speaker"
  config.cv.n_folds = 5
  # EmoDB's files here last 2.0 s, CASIA's 1-5 s (mean 2): one clip length for both, so that
  # a model trained on one reads the other's features.
  config.features.max_seconds = 3.0
  return config
