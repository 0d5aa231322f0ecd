"""The FID InceptionV3 in Flax, and a torch-free loader for its standard weights file.

`FIDInceptionV3` is pytorch-fid's network (torchvision InceptionV3 with the
`FIDInceptionA/C/E_1/E_2` blocks that reproduce the 2015 TensorFlow graph): average pools
in the A, C and E_1 blocks exclude padding from the mean, the last block (E_2) max-pools,
and there are 1008 classes. Inputs are NHWC images in [0, 1]; they are resized to 299×299
(bilinear, half-pixel centres, no antialiasing: torch's `F.interpolate(mode='bilinear',
align_corners=False)`) and scaled to [-1, 1]. Outputs are the 2048-d pool3 features (FID)
and the 1008-way logits (IS).

`load_fid_weights(path)` reads `pt_inception-2015-12-05-6726825d.pth` (a PyTorch state
dict) without torch: both torch.save formats (zip, and the legacy pre-1.6 stream) are read
by a restricted unpickler that only rebuilds tensors. The same state dict saved as
`.npz` or `.safetensors` (same key names) also loads; with torch at hand, the one-line
conversion is
  `safetensors.torch.save_file(torch.load(pth), "fid_inception.safetensors")`.
"""
import io
import pathlib
import pickle
import struct
import zipfile
from typing import Any, Callable, Mapping, Optional, Sequence, Union

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from sd3_jax.data import schema

Array = jax.Array
PathLike = Union[str, pathlib.Path]

NUM_CLASSES = 1008
FEATURE_DIM = 2048
INPUT_SIZE = 299

# --- Network ------------------------------------------------------------------------------


def _pair(v) -> tuple[int, int]:
  return (v, v) if isinstance(v, int) else tuple(v)


class BasicConv(nn.Module):
  """Conv (no bias) + BatchNorm (eps 1e-3, running statistics) + ReLU."""
  features: int
  kernel: Any = 1
  stride: Any = 1
  padding: Any = 0

  @nn.compact
  def __call__(self, x: Array) -> Array:
    ph, pw = _pair(self.padding)
    x = nn.Conv(self.features, _pair(self.kernel), _pair(self.stride),
                padding=((ph, ph), (pw, pw)), use_bias=False, name="conv")(x)
    x = nn.BatchNorm(use_running_average=True, epsilon=1e-3, name="bn")(x)
    return nn.relu(x)


def _avg_pool_3x3(x: Array) -> Array:
  # The FID blocks' avg_pool2d(..., count_include_pad=False).
  return nn.avg_pool(x, (3, 3), (1, 1), ((1, 1), (1, 1)), count_include_pad=False)


def _max_pool_3x3_s2(x: Array) -> Array:
  return nn.max_pool(x, (3, 3), (2, 2))


class InceptionA(nn.Module):
  pool_features: int

  @nn.compact
  def __call__(self, x):
    b1 = BasicConv(64, name="branch1x1")(x)
    b5 = BasicConv(48, name="branch5x5_1")(x)
    b5 = BasicConv(64, 5, padding=2, name="branch5x5_2")(b5)
    b3 = BasicConv(64, name="branch3x3dbl_1")(x)
    b3 = BasicConv(96, 3, padding=1, name="branch3x3dbl_2")(b3)
    b3 = BasicConv(96, 3, padding=1, name="branch3x3dbl_3")(b3)
    bp = BasicConv(self.pool_features, name="branch_pool")(_avg_pool_3x3(x))
    return jnp.concatenate([b1, b5, b3, bp], axis=-1)


class InceptionB(nn.Module):

  @nn.compact
  def __call__(self, x):
    b3 = BasicConv(384, 3, stride=2, name="branch3x3")(x)
    bd = BasicConv(64, name="branch3x3dbl_1")(x)
    bd = BasicConv(96, 3, padding=1, name="branch3x3dbl_2")(bd)
    bd = BasicConv(96, 3, stride=2, name="branch3x3dbl_3")(bd)
    return jnp.concatenate([b3, bd, _max_pool_3x3_s2(x)], axis=-1)


class InceptionC(nn.Module):
  channels_7x7: int

  @nn.compact
  def __call__(self, x):
    c = self.channels_7x7
    b1 = BasicConv(192, name="branch1x1")(x)
    b7 = BasicConv(c, name="branch7x7_1")(x)
    b7 = BasicConv(c, (1, 7), padding=(0, 3), name="branch7x7_2")(b7)
    b7 = BasicConv(192, (7, 1), padding=(3, 0), name="branch7x7_3")(b7)
    bd = BasicConv(c, name="branch7x7dbl_1")(x)
    bd = BasicConv(c, (7, 1), padding=(3, 0), name="branch7x7dbl_2")(bd)
    bd = BasicConv(c, (1, 7), padding=(0, 3), name="branch7x7dbl_3")(bd)
    bd = BasicConv(c, (7, 1), padding=(3, 0), name="branch7x7dbl_4")(bd)
    bd = BasicConv(192, (1, 7), padding=(0, 3), name="branch7x7dbl_5")(bd)
    bp = BasicConv(192, name="branch_pool")(_avg_pool_3x3(x))
    return jnp.concatenate([b1, b7, bd, bp], axis=-1)


class InceptionD(nn.Module):

  @nn.compact
  def __call__(self, x):
    b3 = BasicConv(192, name="branch3x3_1")(x)
    b3 = BasicConv(320, 3, stride=2, name="branch3x3_2")(b3)
    b7 = BasicConv(192, name="branch7x7x3_1")(x)
    b7 = BasicConv(192, (1, 7), padding=(0, 3), name="branch7x7x3_2")(b7)
    b7 = BasicConv(192, (7, 1), padding=(3, 0), name="branch7x7x3_3")(b7)
    b7 = BasicConv(192, 3, stride=2, name="branch7x7x3_4")(b7)
    return jnp.concatenate([b3, b7, _max_pool_3x3_s2(x)], axis=-1)


class InceptionE(nn.Module):
  """FIDInceptionE_1 (`max_pool=False`: padding-excluding average pool) or E_2 (max pool)."""
  max_pool: bool

  @nn.compact
  def __call__(self, x):
    b1 = BasicConv(320, name="branch1x1")(x)
    b3 = BasicConv(384, name="branch3x3_1")(x)
    b3 = jnp.concatenate([
        BasicConv(384, (1, 3), padding=(0, 1), name="branch3x3_2a")(b3),
        BasicConv(384, (3, 1), padding=(1, 0), name="branch3x3_2b")(b3)], axis=-1)
    bd = BasicConv(448, name="branch3x3dbl_1")(x)
    bd = BasicConv(384, 3, padding=1, name="branch3x3dbl_2")(bd)
    bd = jnp.concatenate([
        BasicConv(384, (1, 3), padding=(0, 1), name="branch3x3dbl_3a")(bd),
        BasicConv(384, (3, 1), padding=(1, 0), name="branch3x3dbl_3b")(bd)], axis=-1)
    if self.max_pool:
      pooled = nn.max_pool(x, (3, 3), (1, 1), ((1, 1), (1, 1)))
    else:
      pooled = _avg_pool_3x3(x)
    bp = BasicConv(192, name="branch_pool")(pooled)
    return jnp.concatenate([b1, b3, bd, bp], axis=-1)


def preprocess(images: Array, size: int = INPUT_SIZE) -> Array:
  """[B, H, W, 3] in [0, 1] -> [B, size, size, 3] in [-1, 1] as pytorch-fid prepares them."""
  images = jnp.asarray(images, jnp.float32)
  if images.shape[1:3] != (size, size):
    images = jax.image.resize(images, (images.shape[0], size, size, images.shape[3]),
                              method="bilinear", antialias=False)
  return 2.0 * images - 1.0


class FIDInceptionV3(nn.Module):
  """Images [B, H, W, 3] in [0, 1] -> (pool3 features [B, 2048], logits [B, 1008]).

  Attributes:
    resize_input: resize to 299×299 first (pytorch-fid's default). Without it any size
      ≥ 75×75 runs (the weights do not depend on the size), which keeps tests cheap.
  """
  resize_input: bool = True

  @nn.compact
  def __call__(self, images: Array) -> tuple[Array, Array]:
    if images.ndim != 4 or images.shape[-1] != 3:
      raise ValueError(f"expected NHWC RGB images, got shape {images.shape}")
    x = preprocess(images) if self.resize_input else 2.0 * jnp.asarray(images,
                                                                        jnp.float32) - 1.0
    x = BasicConv(32, 3, stride=2, name="Conv2d_1a_3x3")(x)
    x = BasicConv(32, 3, name="Conv2d_2a_3x3")(x)
    x = BasicConv(64, 3, padding=1, name="Conv2d_2b_3x3")(x)
    x = _max_pool_3x3_s2(x)
    x = BasicConv(80, name="Conv2d_3b_1x1")(x)
    x = BasicConv(192, 3, name="Conv2d_4a_3x3")(x)
    x = _max_pool_3x3_s2(x)
    x = InceptionA(32, name="Mixed_5b")(x)
    x = InceptionA(64, name="Mixed_5c")(x)
    x = InceptionA(64, name="Mixed_5d")(x)
    x = InceptionB(name="Mixed_6a")(x)
    x = InceptionC(128, name="Mixed_6b")(x)
    x = InceptionC(160, name="Mixed_6c")(x)
    x = InceptionC(160, name="Mixed_6d")(x)
    x = InceptionC(192, name="Mixed_6e")(x)
    x = InceptionD(name="Mixed_7a")(x)
    x = InceptionE(max_pool=False, name="Mixed_7b")(x)
    x = InceptionE(max_pool=True, name="Mixed_7c")(x)
    features = jnp.mean(x, axis=(1, 2))
    logits = nn.Dense(NUM_CLASSES, name="fc")(features)
    return features, logits


# --- Reading PyTorch state dicts without torch -----------------------------------------------

_STORAGE_DTYPES = {
    "FloatStorage": np.float32, "DoubleStorage": np.float64, "HalfStorage": np.float16,
    "BFloat16Storage": jnp.bfloat16, "LongStorage": np.int64, "IntStorage": np.int32,
    "ShortStorage": np.int16, "CharStorage": np.int8, "ByteStorage": np.uint8,
    "BoolStorage": np.bool_,
}
_LEGACY_MAGIC = 0x1950a86a20f9469cfc6c


class _StorageType:
  def __init__(self, name: str):
    self.dtype = np.dtype(_STORAGE_DTYPES[name])


def _rebuild_tensor(storage, offset, size, stride, *unused_args):
  itemsize = storage.dtype.itemsize
  if not size:
    return storage[offset:offset + 1].reshape(()).copy()
  return np.lib.stride_tricks.as_strided(
      storage[offset:], shape=tuple(size),
      strides=tuple(s * itemsize for s in stride)).copy()


def _rebuild_parameter(data, *unused_args):
  return data


class _Opaque:
  """Stands in for any other object of a lenient load (Lightning's callbacks, omegaconf
  hyper-parameters, ...): it absorbs its arguments and state and runs no code."""

  def __init__(self, *args, **kwargs):
    del args, kwargs

  def __setstate__(self, state):
    del state


class _StateDictUnpickler(pickle.Unpickler):
  """Rebuilds tensors as numpy arrays; refuses every other global (no code execution), or
  with `lenient` replaces it by an inert `_Opaque`."""

  def __init__(self, file, load_storage, rebuild_tensor=_rebuild_tensor, lenient=False):
    super().__init__(file)
    self._load_storage = load_storage
    self._rebuild_tensor = rebuild_tensor
    self._lenient = lenient

  def find_class(self, module, name):
    if module == "collections" and name == "OrderedDict":
      import collections  # pylint: disable=import-outside-toplevel
      return collections.OrderedDict
    if module == "torch._utils" and name == "_rebuild_tensor_v2":
      return self._rebuild_tensor
    if module == "torch._utils" and name == "_rebuild_parameter":
      return _rebuild_parameter
    if module == "torch" and name in _STORAGE_DTYPES:
      return _StorageType(name)
    if self._lenient:
      return _Opaque
    raise pickle.UnpicklingError(f"refusing to load {module}.{name}: not part of a "
                                 "tensor state dict")

  def persistent_load(self, pid):
    if not (isinstance(pid, tuple) and pid and pid[0] == "storage"):
      raise pickle.UnpicklingError(f"unsupported persistent id {pid!r}")
    storage_type, key = pid[1], str(pid[2])
    return self._load_storage(key, storage_type.dtype)


def _load_zip(path: pathlib.Path, lenient: bool = False) -> Any:
  with zipfile.ZipFile(path) as zf:
    names = zf.namelist()
    pkl = [n for n in names if n.endswith("/data.pkl") or n == "data.pkl"]
    if len(pkl) != 1:
      raise schema.DataError("not a torch.save zip (no data.pkl)", file=str(path))
    prefix = pkl[0][:-len("data.pkl")]

    def load_storage(key, dtype):
      return np.frombuffer(zf.read(f"{prefix}data/{key}"), dtype=dtype)

    return _StateDictUnpickler(io.BytesIO(zf.read(pkl[0])), load_storage,
                               lenient=lenient).load()


def _load_legacy(path: pathlib.Path, lenient: bool = False) -> Any:
  """torch.save's pre-1.6 stream: magic, version, sys info, the pickle, storage blobs."""
  raw = path.read_bytes()
  f = io.BytesIO(raw)
  if pickle.load(f) != _LEGACY_MAGIC:
    raise schema.DataError("not a PyTorch checkpoint (bad magic number)", file=str(path))
  pickle.load(f)  # protocol version
  pickle.load(f)  # sys info
  dtypes = {}

  def load_storage(key, dtype):
    dtypes[key] = dtype
    return key  # placeholder; the blobs follow the pickle

  tensors = []

  def rebuild(storage, offset, size, stride, *args):
    tensors.append((storage, offset, size, stride))
    return ("__tensor__", len(tensors) - 1)

  obj = _StateDictUnpickler(f, load_storage, rebuild, lenient=lenient).load()
  storages = {}
  for key in pickle.load(f):
    (numel,) = struct.unpack("<q", f.read(8))
    dtype = np.dtype(dtypes[str(key)])
    storages[str(key)] = np.frombuffer(f.read(numel * dtype.itemsize), dtype=dtype)

  def resolve(v):
    if isinstance(v, tuple) and len(v) == 2 and v[0] == "__tensor__":
      storage, offset, size, stride = tensors[v[1]]
      return _rebuild_tensor(storages[storage], offset, size, stride)
    if isinstance(v, Mapping):
      return {k: resolve(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
      return type(v)(resolve(x) for x in v)
    return v

  return resolve(obj)


def load_torch_object(path: PathLike, lenient: bool = False) -> Any:
  """Whatever `torch.save` wrote (zip or legacy), tensors as numpy arrays, without torch.

  Only tensors, storages and plain containers are rebuilt; with `lenient` every other
  object (as in a Lightning `.ckpt`) becomes an inert placeholder, else it is refused.
  """
  path = pathlib.Path(path)
  if not path.exists():
    raise schema.DataError("file not found", file=str(path))
  try:
    if zipfile.is_zipfile(path):
      return _load_zip(path, lenient)
    return _load_legacy(path, lenient)
  except (pickle.UnpicklingError, EOFError, KeyError, ValueError, struct.error) as e:
    if isinstance(e, schema.DataError):
      raise
    raise schema.DataError(f"cannot read PyTorch file: {e}", file=str(path)) from e


def load_state_dict(path: PathLike) -> dict[str, np.ndarray]:
  """A PyTorch state dict (.pth/.pt zip or legacy), `.npz` or `.safetensors` -> numpy arrays."""
  path = pathlib.Path(path)
  if not path.exists():
    raise schema.DataError("weights file not found", file=str(path))
  import safetensors.numpy  # pylint: disable=import-outside-toplevel
  try:
    if path.suffix == ".safetensors":
      return dict(safetensors.numpy.load_file(str(path)))
    if path.suffix == ".npz":
      with np.load(path) as z:
        return {k: z[k] for k in z.files}
  except (KeyError, ValueError, OSError, safetensors.SafetensorError) as e:
    raise schema.DataError(f"cannot read state dict: {e}", file=str(path)) from e
  state = load_torch_object(path)
  if not isinstance(state, Mapping):
    raise schema.DataError(f"expected a state dict, got {type(state).__name__}",
                           file=str(path))
  return {str(k): np.asarray(v) for k, v in state.items()}


# --- Conversion ----------------------------------------------------------------------------

_IGNORED_SUFFIXES = ("num_batches_tracked",)


def _torch_to_flax(key: str, value: np.ndarray) -> tuple[str, tuple[str, ...], np.ndarray]:
  """'Mixed_5b.branch1x1.conv.weight' -> ('params', path, array in Flax layout)."""
  parts = key.split(".")
  *mod, leaf = parts
  if leaf == "weight" and value.ndim == 4:  # conv OIHW -> HWIO
    return "params", (*mod, "kernel"), value.transpose(2, 3, 1, 0)
  if leaf == "weight" and mod[-1] == "fc":  # linear [out, in] -> [in, out]
    return "params", (*mod, "kernel"), value.T
  if leaf == "weight":
    return "params", (*mod, "scale"), value
  if leaf == "bias":
    return "params", (*mod, "bias"), value
  if leaf == "running_mean":
    return "batch_stats", (*mod, "mean"), value
  if leaf == "running_var":
    return "batch_stats", (*mod, "var"), value
  raise KeyError(key)


def convert_state_dict(
    state: Mapping[str, np.ndarray], module: nn.Module, init_args: tuple, *,
    key_map: Callable[[str, np.ndarray], tuple[str, tuple[str, ...], np.ndarray]] = (
        _torch_to_flax),
    ignored_suffixes: tuple[str, ...] = _IGNORED_SUFFIXES,
    source: str = "<state dict>",
    collections: Optional[Sequence[str]] = None) -> dict[str, Any]:
  """Maps a torch-named state dict onto `module`'s variables, checking keys and shapes.

  `key_map(key, array)` gives (collection, Flax path, array in Flax layout) or raises
  KeyError; `init_args` are example inputs for `module.init`. Every model variable must be
  filled and every weight (except `ignored_suffixes` bookkeeping) used; the error lists
  the missing and unused keys. `collections` limits the check to those variable
  collections (the others are the caller's).
  """
  shapes = jax.eval_shape(lambda: module.init(jax.random.PRNGKey(0), *init_args))
  expected = {(col, *path): leaf for col, tree in shapes.items()
              if collections is None or col in collections
              for path, leaf in flax.traverse_util.flatten_dict(tree).items()}
  out, unused = {}, []
  for key, value in state.items():
    if key.endswith(ignored_suffixes):
      continue
    try:
      col, path, arr = key_map(key, np.asarray(value))
    except KeyError:
      unused.append(key)
      continue
    target = (col, *path)
    if target not in expected:
      unused.append(key)
      continue
    if tuple(arr.shape) != tuple(expected[target].shape):
      raise schema.DataError(f"shape {value.shape} does not fit the model "
                             f"({expected[target].shape} after transposition)",
                             file=source, field=key)
    out[target] = jnp.asarray(arr, dtype=expected[target].dtype)
  missing = sorted(".".join(k) for k in set(expected) - set(out))
  if missing or unused:
    raise schema.DataError(f"weights do not match the model: missing {missing[:10]} "
                           f"({len(missing)} in all), unused {sorted(unused)[:10]} "
                           f"({len(unused)} in all)", file=source)
  return flax.traverse_util.unflatten_dict(out)


def load_fid_weights(path: PathLike) -> dict[str, Any]:
  """The FID Inception weights file -> Flax variables {'params', 'batch_stats'}."""
  return convert_state_dict(load_state_dict(path), FIDInceptionV3(resize_input=False),
                            (jnp.zeros((1, 75, 75, 3)),), source=str(path))


@jax.jit
def _fid_apply(variables, images):
  return FIDInceptionV3().apply(variables, images)


def fid_features(variables: Mapping[str, Any], images: np.ndarray,
                 batch_size: int = 64) -> tuple[np.ndarray, np.ndarray]:
  """Batched jitted (pool3 features [N, 2048], logits [N, 1008]) of images in [0, 1].

  The last partial batch is padded to `batch_size` so only one shape is compiled.
  """
  images = np.asarray(images, np.float32)
  feats, logits = [], []
  for i in range(0, len(images), batch_size):
    batch = images[i:i + batch_size]
    n = len(batch)
    if n < batch_size:
      batch = np.concatenate([batch, np.zeros((batch_size - n,) + batch.shape[1:],
                                              batch.dtype)])
    f, l = _fid_apply(variables, jnp.asarray(batch))
    feats.append(np.asarray(f)[:n])
    logits.append(np.asarray(l)[:n])
  return np.concatenate(feats), np.concatenate(logits)
