"""Speech emotion recognition in JAX/Flax: focal-loss ResNet-18 on log-mel and MFCC features."""

from ser_jax import malloc, xla_flags

xla_flags.apply()
malloc.apply()

__version__ = "0.1.0"
