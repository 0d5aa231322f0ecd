"""Test set-up: 8 forced CPU devices so sharding is really exercised.

XLA_FLAGS must be set before jax is imported anywhere, hence at conftest import time.
"""
import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import pathlib  # noqa: E402

import jax  # noqa: E402
import pytest  # noqa: E402

# Tests are tiny and compile-bound: skipping most XLA optimisations roughly halves them.
jax.config.update("jax_disable_most_optimizations", True)

REPO = pathlib.Path(__file__).resolve().parent.parent
TESTDATA = REPO / "tests" / "testdata"
# The real VSD validation files live beside the checkout (CI copies shared/ next to the clone).
SHARED_VSD = REPO.parent / "shared" / "data" / "vsd"


@pytest.fixture
def testdata():
  return TESTDATA


@pytest.fixture
def shared_vsd():
  if not SHARED_VSD.exists():
    pytest.skip(f"real VSD files not found at {SHARED_VSD}")
  return SHARED_VSD


@pytest.fixture(scope="session")
def tiny_config(tmp_path_factory):
  """The `tiny` experiment with its data prepared once per test session."""
  from sd3_jax import config_lib
  from sd3_jax.data import builders

  config = config_lib.load_config(REPO / "experiments" / "spatial_scenes.py", "tiny")
  config.data.dir = str(tmp_path_factory.mktemp("tiny_data"))
  info = builders.prepare_spatial_scenes(config.data.dir, config.data)
  config.lock()
  return config, info

