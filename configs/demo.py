"""The built-in synthetic corpus: the whole pipeline in a few minutes on a laptop CPU.

python -m ser_jax.main --config=configs/demo.py --workdir=runs/demo
"""

from ser_jax.config import default_config


def get_config():
  config = default_config()
  config.data.corpus = "demo"
  config.features.kind = "mfcc"
  config.features.max_seconds = 3.0  # Demo clips last 1.5-3.5 s; shorter inputs train faster.
  config.loss.name = "focal"
  config.loss.gamma = 2.0
  config.model.width = 16  # A narrower ResNet-18 keeps 5 folds within minutes on 2 cores.
  config.train.num_epochs = 12
  config.train.warmup_epochs = 1
  config.train.checkpoint_every_epochs = 4
  return config
