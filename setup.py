"""sd3_jax: Spatial Dual Discrete Diffusion (SD³, NeurIPS 2024) in JAX/Flax."""
import pathlib

import setuptools

_HERE = pathlib.Path(__file__).parent


def _requirements():
  lines = (_HERE / "requirements.txt").read_text().splitlines()
  return [l.strip() for l in lines if l.strip() and not l.startswith("#")]


setuptools.setup(
    name="sd3_jax",
    version="0.1.0",
    description="SD³: synergistic dual spatial-aware image-to-text and text-to-image generation in JAX/Flax",
    long_description=(_HERE / "README.md").read_text(),
    long_description_content_type="text/markdown",
    packages=setuptools.find_packages(include=["sd3_jax", "sd3_jax.*"]),
    python_requires=">=3.10",
    install_requires=_requirements(),
    extras_require={
        "test": ["pytest==9.0.3", "pycocoevalcap==1.2", "nbclient==0.11.0", "nbformat==5.11.1",
                 "ipykernel==7.4.0"],
        # METEOR / SPICE: pycocoevalcap's jars (Java 8+ on PATH; SPICE also needs its
        # Stanford CoreNLP models in eval.spice_dir, nothing is downloaded).
        "eval": ["pycocoevalcap==1.2"],
        # `python -m sd3_jax.pretrained check` and its tests: the torch reference models
        # (transformers' torch CLIP / GPT-2). The CPU wheel; taming's VQGAN modules come from
        # `pip install --no-deps taming-transformers-rom1504==0.0.6` (its declared
        # dependencies would pull a CUDA torch and Lightning, which the check does not use).
        "parity": ["torch==2.13.0"],
        # `python -m sd3_jax.benchmarks.peer`: the peer, diffusers' VQ-Diffusion transformer.
        "bench": ["torch==2.13.0", "diffusers==0.42.1"],
        "tpu": ["jax[tpu]==0.10.2"],
        "cuda12": ["jax[cuda12]==0.10.2"],
    },
)
