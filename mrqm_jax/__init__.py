"""MRQM small-object detector in JAX/Flax."""
