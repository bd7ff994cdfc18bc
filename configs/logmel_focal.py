"""The paper's Table 4 setting: 128-band log-mel spectrogram (dB), ResNet-18, focal loss, IEMOCAP improvised.

python -m ser_jax.main --config=configs/logmel_focal.py --workdir=runs/logmel_focal \
  --config.data.root=/path/to/IEMOCAP_full_release
"""

from ser_jax.config import default_config


def get_config():
  config = default_config()
  config.data.corpus = "iemocap"
  config.features.kind = "logmel"
  config.loss.name = "focal"
  config.loss.gamma = 2.0
  return config
