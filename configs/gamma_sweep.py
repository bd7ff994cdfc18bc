"""Focal loss gamma ablation: six gammas x three seeds (18 members) trained together.

python -m ser_jax.main --config=configs/gamma_sweep.py --workdir=runs/gamma_sweep \
  --config.data.root=/path/to/IEMOCAP_full_release
python -m ser_jax.main --config=configs/gamma_sweep.py:demo --workdir=runs/gamma_sweep_demo

Every member sees the same folds and batches and differs only in its gamma and seed
(initialisation and augmentation); gamma 0 is the softmax loss. Members train in vmapped
programs sized to the machine's memory (train.models_per_program=0; one at a time on CPUs).
"""

from ser_jax.config import default_config


def get_config(arg: str = "iemocap"):
  config = default_config()
  config.data.corpus = arg
  config.features.kind = "mfcc"
  config.loss.name = "focal"
  config.sweep.gammas = (0.0, 0.5, 1.0, 2.0, 3.0, 5.0)
  config.sweep.seeds = (0, 1, 2)
  if arg == "demo":  # Sized like configs/demo.py.
    config.features.max_seconds = 3.0
    config.model.width = 16
    config.train.num_epochs = 12
    config.train.warmup_epochs = 1
    config.train.checkpoint_every_epochs = 4
  return config
