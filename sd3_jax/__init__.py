"""sd3_jax: Spatial Dual Discrete Diffusion (SD³) in JAX/Flax."""
