"""Speech emotion recognition in JAX/Flax: focal-loss ResNet-18 on log-mel and MFCC features."""

__version__ = "0.1.0"
