"""The paper's best setting (Table 4): 40 MFCCs, ResNet-18, focal loss, IEMOCAP improvised.

python -m ser_jax.main --config=configs/mfcc_focal.py --workdir=runs/mfcc_focal \
  --config.data.root=/path/to/IEMOCAP_full_release
"""

from ser_jax.config import default_config


def get_config():
  config = default_config()
  config.data.corpus = "iemocap"
  config.features.kind = "mfcc"
  config.loss.name = "focal"
  config.loss.gamma = 2.0
  return config
