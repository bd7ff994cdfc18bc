"""The paper's claim, tested: does focal loss beat softmax (and class-weighted softmax)
under IEMOCAP's class imbalance? On any corpus, resampled to IEMOCAP's class shares.

python -m ser_jax.main --config=configs/focal_claim.py:emodb --workdir=runs/focal_claim_emodb \
  --config.data.root=/path/to/emodb
python -m ser_jax.report --compare runs/focal_claim_emodb        # each setting vs softmax
python -m ser_jax.report --compare runs/focal_claim_emodb --reference=inverse_frequency

MFCC input and the paper's stratified 5-fold protocol on the largest subset of the corpus
with IEMOCAP improvised's class shares (neutral 1099, happiness 284, sadness 608, anger
289). Every gamma (0 is softmax) trains with and without inverse-frequency class weights
(gamma 0 with them is weighted cross entropy; gamma > 0 with them is the original focal
loss's alpha-balanced form), three seeds each: 30 members over the same folds and batches.
"""

from ser_jax.config import default_config

# IEMOCAP improvised, four classes: utterances per class (neutral, happiness, sadness, anger).
IEMOCAP_IMPROVISED_COUNTS = (1099, 284, 608, 289)


def get_config(arg: str = "iemocap"):
  config = default_config()
  config.data.corpus = arg
  config.data.class_shares = IEMOCAP_IMPROVISED_COUNTS if arg != "iemocap" else ()
  config.features.kind = "mfcc"
  config.loss.name = "focal"
  config.cv.scheme = "stratified"
  config.cv.n_folds = 5
  config.sweep.gammas = (0.0, 0.5, 1.0, 2.0, 5.0)
  config.sweep.alphas = ((), "inverse_frequency")
  config.sweep.seeds = (0, 1, 2)
  if arg == "emodb":  # Its files are 2.0 s long.
    config.features.max_seconds = 2.0
  return config
