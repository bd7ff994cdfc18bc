"""The focal-loss claim on every EmoBox corpus at hand, on EmoBox's own folds.

python -m ser_jax.study --config=configs/emobox_study.py:/path/to/EmoBox --workdir=runs/emobox

Focal loss (gamma 2, the paper's) against softmax cross entropy (the reference), MFCC input,
the paper's four classes, on EmoBox's folds (cv.scheme='given'), each (corpus, setting) an
ordinary run. The corpora: every data/<dataset>/ of the EmoBox checkout whose audio is in its
downloads/<dataset>/ (EmoBox's own layout). Without an argument: the EmoBox metadata of
EmoDB and CASIA in $SER_JAX_DATA/emobox, with their audio in $SER_JAX_DATA/emodb and
$SER_JAX_DATA/casia/wav. Without either, give the corpora with
--config.study.corpora='("name=emobox:ROOT@AUDIO_ROOT",)'. A corpus without one of the four
classes fails alone. As separate jobs: --list_runs, --task_index=I
(launch/slurm_study.sbatch), --summarise.
"""

import os
import pathlib

from ser_jax.study.compose import study_config


def emobox_corpora(checkout: pathlib.Path) -> tuple[str, ...]:
  """'name=emobox:ROOT@AUDIO_ROOT' of each dataset of the checkout whose audio it has."""
  return tuple(
    f"{root.name}=emobox:{root}@{checkout}"
    for root in sorted((checkout / "data").glob("*/"))
    if (root / f"{root.name}.jsonl").is_file() and (checkout / "downloads" / root.name).is_dir()
  )


def get_config(checkout: str = ""):
  config = study_config("configs/mfcc_focal.py")
  if checkout:
    config.study.corpora = emobox_corpora(pathlib.Path(checkout).expanduser().resolve())
  elif data := os.environ.get("SER_JAX_DATA"):
    data = pathlib.Path(data)
    config.study.corpora = (
      f"emodb=emobox:{data / 'emobox' / 'emodb'}@{data / 'emodb'}",
      f"casia=emobox:{data / 'emobox' / 'casia'}@{data / 'casia' / 'wav'}",
    )
  config.study.settings = {
    "softmax": {"loss": {"name": "softmax"}},
    "focal": {"loss": {"name": "focal", "gamma": 2.0}},
  }
  config.study.reference = "softmax"
  config.data.corpus = "emobox"  # Each corpus's run sets its own; this validates the keys below.
  config.cv.scheme = "given"
  # EmoBox's metadata was made from the original releases: CASIA's paths differ in letter
  # case from its folders (each is logged; without this they are skips naming the file).
  config.data.case_insensitive_paths = True
  return config
