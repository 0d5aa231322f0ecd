"""sd3_jax: Spatial Dual Discrete Diffusion (SD³) in JAX/Flax."""
import os as _os

# transformers serves tokenizers here (no PyTorch models); its "PyTorch was not found" advice
# says nothing to a user of this package.
_os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
