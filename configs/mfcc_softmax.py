"""The paper's Table 4 setting: 40 MFCCs, ResNet-18, softmax cross entropy, IEMOCAP improvised.

python -m ser_jax.main --config=configs/mfcc_softmax.py --workdir=runs/mfcc_softmax \
  --config.data.root=/path/to/IEMOCAP_full_release
"""

from ser_jax.config import default_config


def get_config():
  config = default_config()
  config.data.corpus = "iemocap"
  config.features.kind = "mfcc"
  config.loss.name = "softmax"
  config.loss.gamma = 0.0
  return config
