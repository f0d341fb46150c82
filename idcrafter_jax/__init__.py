"""idcrafter-jax: ID-Crafter multi-subject video generation in JAX/Flax."""
__version__ = "0.1.0"
