"""Pure jax.numpy operations: no Flax, no I/O. Every public op is jittable and vmappable."""
