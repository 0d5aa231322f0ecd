"""Tests for the FID InceptionV3: weight loading from torch-format files, use of every
weight, and the input preprocessing against torch's bilinear formula."""
import collections
import io
import pickle
import struct
import sys
import types
import zipfile

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy

from sd3_jax.data.schema import DataError
from sd3_jax.scores import inception


def _torch_key_shapes():
  """(key, shape) of pytorch-fid's FIDInceptionV3 state dict, written from torchvision's
  module definitions independently of the Flax model."""
  convs = [("Conv2d_1a_3x3", 3, 32, 3), ("Conv2d_2a_3x3", 32, 32, 3),
           ("Conv2d_2b_3x3", 32, 64, 3), ("Conv2d_3b_1x1", 64, 80, 1),
           ("Conv2d_4a_3x3", 80, 192, 3)]

  def a(name, cin, pool):
    return [(f"{name}.branch1x1", cin, 64, 1), (f"{name}.branch5x5_1", cin, 48, 1),
            (f"{name}.branch5x5_2", 48, 64, 5), (f"{name}.branch3x3dbl_1", cin, 64, 1),
            (f"{name}.branch3x3dbl_2", 64, 96, 3), (f"{name}.branch3x3dbl_3", 96, 96, 3),
            (f"{name}.branch_pool", cin, pool, 1)]

  def c(name, c7):
    return [(f"{name}.branch1x1", 768, 192, 1), (f"{name}.branch7x7_1", 768, c7, 1),
            (f"{name}.branch7x7_2", c7, c7, (1, 7)), (f"{name}.branch7x7_3", c7, 192, (7, 1)),
            (f"{name}.branch7x7dbl_1", 768, c7, 1),
            (f"{name}.branch7x7dbl_2", c7, c7, (7, 1)),
            (f"{name}.branch7x7dbl_3", c7, c7, (1, 7)),
            (f"{name}.branch7x7dbl_4", c7, c7, (7, 1)),
            (f"{name}.branch7x7dbl_5", c7, 192, (1, 7)), (f"{name}.branch_pool", 768, 192, 1)]

  def e(name, cin):
    return [(f"{name}.branch1x1", cin, 320, 1), (f"{name}.branch3x3_1", cin, 384, 1),
            (f"{name}.branch3x3_2a", 384, 384, (1, 3)),
            (f"{name}.branch3x3_2b", 384, 384, (3, 1)),
            (f"{name}.branch3x3dbl_1", cin, 448, 1), (f"{name}.branch3x3dbl_2", 448, 384, 3),
            (f"{name}.branch3x3dbl_3a", 384, 384, (1, 3)),
            (f"{name}.branch3x3dbl_3b", 384, 384, (3, 1)),
            (f"{name}.branch_pool", cin, 192, 1)]

  convs += a("Mixed_5b", 192, 32) + a("Mixed_5c", 256, 64) + a("Mixed_5d", 288, 64)
  convs += [("Mixed_6a.branch3x3", 288, 384, 3), ("Mixed_6a.branch3x3dbl_1", 288, 64, 1),
            ("Mixed_6a.branch3x3dbl_2", 64, 96, 3), ("Mixed_6a.branch3x3dbl_3", 96, 96, 3)]
  convs += c("Mixed_6b", 128) + c("Mixed_6c", 160) + c("Mixed_6d", 160) + c("Mixed_6e", 192)
  convs += [("Mixed_7a.branch3x3_1", 768, 192, 1), ("Mixed_7a.branch3x3_2", 192, 320, 3),
            ("Mixed_7a.branch7x7x3_1", 768, 192, 1),
            ("Mixed_7a.branch7x7x3_2", 192, 192, (1, 7)),
            ("Mixed_7a.branch7x7x3_3", 192, 192, (7, 1)),
            ("Mixed_7a.branch7x7x3_4", 192, 192, 3)]
  convs += e("Mixed_7b", 1280) + e("Mixed_7c", 2048)
  out = []
  for name, cin, cout, k in convs:
    kh, kw = (k, k) if isinstance(k, int) else k
    out.append((f"{name}.conv.weight", (cout, cin, kh, kw)))
    for leaf in ("weight", "bias", "running_mean", "running_var"):
      out.append((f"{name}.bn.{leaf}", (cout,)))
    out.append((f"{name}.bn.num_batches_tracked", ()))
  return out + [("fc.weight", (1008, 2048)), ("fc.bias", (1008,))]


def _random_state_dict(seed=0):
  """Random weights that keep activations O(1) through the 94 conv-BN-ReLU layers."""
  rng = np.random.default_rng(seed)
  state = collections.OrderedDict()
  for key, shape in _torch_key_shapes():
    if key.endswith("num_batches_tracked"):
      state[key] = np.array(7, np.int64)
    elif key.endswith("conv.weight"):
      fan_in = np.prod(shape[1:])
      state[key] = rng.normal(0, np.sqrt(2.0 / fan_in), shape).astype(np.float32)
    elif key.endswith("running_var"):
      state[key] = rng.uniform(0.5, 2.0, shape).astype(np.float32)
    elif key.endswith("bn.weight"):
      state[key] = rng.uniform(0.5, 1.5, shape).astype(np.float32)
    else:
      state[key] = rng.normal(0, 0.1, shape).astype(np.float32)
  return state


# --- A torch.save-format writer (torch is not installed here) -------------------------------

_STORAGE_NAMES = {np.dtype(np.float32): "FloatStorage", np.dtype(np.int64): "LongStorage"}


class _Storage:
  def __init__(self, key, data):
    self.key, self.data = key, data


def _torch_modules():
  """Modules named like torch's so pickle writes the same GLOBAL opcodes torch.save does."""
  torch_mod, utils_mod = types.ModuleType("torch"), types.ModuleType("torch._utils")

  def _rebuild_tensor_v2(*args):
    raise AssertionError("writer only")

  _rebuild_tensor_v2.__module__ = "torch._utils"
  _rebuild_tensor_v2.__qualname__ = "_rebuild_tensor_v2"
  utils_mod._rebuild_tensor_v2 = _rebuild_tensor_v2
  for name in _STORAGE_NAMES.values():
    setattr(torch_mod, name, type(name, (), {"__module__": "torch", "__qualname__": name}))
  torch_mod._utils = utils_mod
  return torch_mod, utils_mod


class _Tensor:
  """A tensor as torch pickles it: _rebuild_tensor_v2(storage, offset, size, stride, ...)."""

  def __init__(self, storage, offset, size, stride):
    self.args = (storage, offset, tuple(size), tuple(stride), False,
                 collections.OrderedDict())

  def __reduce__(self):
    return sys.modules["torch._utils"]._rebuild_tensor_v2, self.args


def _tensors_for(state):
  """Storages and tensor records; fc.weight is stored transposed at an offset (a strided
  view), as torch does for views of a larger storage."""
  storages, tensors = [], collections.OrderedDict()
  for i, (key, value) in enumerate(state.items()):
    if key == "fc.weight":
      data = np.concatenate([np.zeros(3, np.float32), value.T.ravel()])
      st = _Storage(str(i), data)
      tensors[key] = _Tensor(st, 3, value.shape, (1, value.shape[0]))
    else:
      st = _Storage(str(i), value.ravel())
      strides = np.cumprod((1,) + value.shape[::-1][:-1])[::-1] if value.ndim else ()
      tensors[key] = _Tensor(st, 0, value.shape, tuple(int(s) for s in strides))
    storages.append(st)
  return storages, tensors


def _save_torch(state, path, legacy, monkeypatch):
  torch_mod, utils_mod = _torch_modules()
  storages, tensors = _tensors_for(state)
  with monkeypatch.context() as m:
    m.setitem(sys.modules, "torch", torch_mod)
    m.setitem(sys.modules, "torch._utils", utils_mod)

    class Pickler(pickle.Pickler):

      def persistent_id(self, obj):
        if isinstance(obj, _Storage):
          cls = getattr(torch_mod, _STORAGE_NAMES[obj.data.dtype])
          pid = ("storage", cls, obj.key, "cpu", obj.data.size)
          return pid + (None,) if legacy else pid
        return None

    buf = io.BytesIO()
    if legacy:
      for header in (0x1950a86a20f9469cfc6c, 1001, {"little_endian": True}):
        pickle.dump(header, buf, protocol=2)
    Pickler(buf, protocol=2).dump(tensors)
  if legacy:
    keys = sorted(s.key for s in storages)
    pickle.dump(keys, buf, protocol=2)
    by_key = {s.key: s for s in storages}
    for k in keys:
      buf.write(struct.pack("<q", by_key[k].data.size) + by_key[k].data.tobytes())
    path.write_bytes(buf.getvalue())
  else:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as zf:
      zf.writestr("archive/data.pkl", buf.getvalue())
      zf.writestr("archive/byteorder", "little")
      for s in storages:
        zf.writestr(f"archive/data/{s.key}", s.data.tobytes())
      zf.writestr("archive/version", "3\n")


@pytest.fixture(scope="module")
def state():
  return _random_state_dict()


@pytest.fixture(scope="module")
def variables(state):
  return inception.convert_state_dict(state, inception.FIDInceptionV3(resize_input=False),
                                      (jnp.zeros((1, 75, 75, 3)),))


@pytest.mark.parametrize("fmt", ["zip", "legacy", "npz", "safetensors"])
def test_load_state_dict_formats(fmt, state, tmp_path, monkeypatch):
  path = tmp_path / ("w.pth" if fmt in ("zip", "legacy") else f"w.{fmt}")
  if fmt in ("zip", "legacy"):
    _save_torch(state, path, fmt == "legacy", monkeypatch)
  elif fmt == "npz":
    np.savez(path, **state)
  else:
    safetensors.numpy.save_file(dict(state), str(path))
  loaded = inception.load_state_dict(path)
  assert set(loaded) == set(state)
  for k, v in state.items():
    np.testing.assert_array_equal(loaded[k], v, err_msg=k)
  if fmt == "zip":  # the full path: file -> Flax variables
    got = inception.load_fid_weights(path)
    np.testing.assert_array_equal(got["params"]["fc"]["kernel"], state["fc.weight"].T)
    np.testing.assert_array_equal(
        got["params"]["Mixed_7c"]["branch_pool"]["conv"]["kernel"],
        state["Mixed_7c.branch_pool.conv.weight"].transpose(2, 3, 1, 0))
    np.testing.assert_array_equal(got["batch_stats"]["Conv2d_1a_3x3"]["bn"]["var"],
                                  state["Conv2d_1a_3x3.bn.running_var"])


def test_unpickler_refuses_other_globals(tmp_path):
  path = tmp_path / "evil.pth"
  with zipfile.ZipFile(path, "w") as zf:
    zf.writestr("archive/data.pkl", pickle.dumps({"x": print}))
  with pytest.raises(DataError, match="refusing to load builtins.print"):
    inception.load_state_dict(path)


def test_convert_reports_missing_unused_and_bad_shapes(state):
  model, x = inception.FIDInceptionV3(resize_input=False), jnp.zeros((1, 75, 75, 3))
  bad = dict(state)
  del bad["Mixed_6b.branch7x7_2.bn.running_var"]
  bad["extra.weight"] = np.zeros(3, np.float32)
  with pytest.raises(DataError, match=r"missing \['batch_stats.Mixed_6b.branch7x7_2.bn.var'\]"
                     r".*unused \['extra.weight'\]"):
    inception.convert_state_dict(bad, model, (x,), source="w.pth")
  bad = dict(state)
  bad["fc.bias"] = np.zeros(10, np.float32)
  with pytest.raises(DataError, match="field 'fc.bias'"):
    inception.convert_state_dict(bad, model, (x,), source="w.pth")


def test_forward_uses_every_weight(variables):
  model = inception.FIDInceptionV3(resize_input=False)
  x = jax.random.uniform(jax.random.PRNGKey(0), (2, 75, 75, 3))

  def loss(v):
    feats, logits = model.apply(v, x)
    return jnp.sum(feats * jnp.arange(feats.shape[-1]) / 1000) + jnp.sum(jnp.sin(logits))

  (feats, logits), grads = jax.jit(lambda v: (model.apply(v, x), jax.grad(loss)(v)))(
      variables)
  assert feats.shape == (2, 2048) and logits.shape == (2, 1008)
  assert np.isfinite(feats).all() and np.isfinite(logits).all()
  assert float(jnp.std(feats)) > 0
  # Every variable (conv kernels, BN scale/bias/mean/var, fc) moves the output.
  flat = flax.traverse_util.flatten_dict(grads)
  assert len(flat) == len(_torch_key_shapes()) - 94  # all but num_batches_tracked
  unused = [k for k, g in flat.items() if not np.any(np.asarray(g))]
  assert not unused
  # And an explicit perturbation of the max-pooling block's pool branch changes features.
  bumped = jax.tree.map(lambda a: a, variables)
  bumped["params"]["Mixed_7c"]["branch_pool"]["conv"]["kernel"] *= 1.5
  f2, _ = jax.jit(model.apply)(bumped, x)
  assert not np.allclose(f2, feats)


def test_fid_features_batches(variables):
  images = np.random.default_rng(0).uniform(size=(3, 40, 40, 3)).astype(np.float32)
  feats, logits = inception.fid_features(variables, images, batch_size=2)
  assert feats.shape == (3, 2048) and logits.shape == (3, 1008)
  # Row i does not depend on its batch-mates or on the padding of the last batch.
  f_last, _ = inception.fid_features(variables, images[2:], batch_size=2)
  np.testing.assert_allclose(f_last[0], feats[2], rtol=1e-4, atol=1e-5)


def _torch_bilinear(img, out):
  """F.interpolate(mode='bilinear', align_corners=False) on [H, W, C], as torch computes it."""

  def axis(n_in, n_out):
    scale = n_in / n_out
    src = np.maximum((np.arange(n_out) + 0.5) * scale - 0.5, 0)
    i0 = np.minimum(np.floor(src).astype(int), n_in - 1)
    i1 = np.minimum(i0 + 1, n_in - 1)
    return i0, i1, src - i0

  h0, h1, lh = axis(img.shape[0], out)
  w0, w1, lw = axis(img.shape[1], out)
  rows = img[h0] * (1 - lh)[:, None, None] + img[h1] * lh[:, None, None]
  return rows[:, w0] * (1 - lw)[None, :, None] + rows[:, w1] * lw[None, :, None]


@pytest.mark.parametrize("size_in", [7, 20, 299])
def test_preprocess_matches_torch_bilinear(size_in):
  img = np.random.default_rng(size_in).uniform(size=(1, size_in, size_in, 3))
  got = np.asarray(inception.preprocess(img, size=13 if size_in != 299 else 299))
  want = 2 * _torch_bilinear(img[0], got.shape[1]) - 1
  np.testing.assert_allclose(got[0], want, atol=1e-5)


def test_avg_pool_excludes_padding():
  x = jnp.ones((1, 4, 4, 1))
  np.testing.assert_allclose(inception._avg_pool_3x3(x), 1.0)  # corners too: not 4/9
