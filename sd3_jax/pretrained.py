"""Pretrained parts from the files people have, converted to Flax and checked against the
reference implementations.

Kinds and their sources (nothing is downloaded):

* `clip`: a HF CLIP directory (config.json + model.safetensors + the CLIP BPE tokenizer
  files) -> `models.clip.FlaxCLIP`, the paper's frozen c^Y / c^I encoders.
* `gpt2`: a HF GPT-2 directory (config.json + model.safetensors + tokenizer files) ->
  `models.gpt2.GPT2`, the text decoder G_T (with its [z^Y ; z^G] prefix) and text marginal.
* `vqgan`: VQ-Diffusion's taming Gumbel VQGAN, a Lightning `.ckpt` (`state_dict` wrapper;
  the architecture is read off the tensor shapes) and optionally its code remapping
  (`taming_vqvae_2887.pt`: full code -> kept id) -> `models.taming_vqgan.GumbelVQGAN`.

    python -m sd3_jax.pretrained convert --kind clip --src DIR --out OUT
    python -m sd3_jax.pretrained check --kind vqgan --src last.ckpt [--mapping remap.pt]

`convert` writes `OUT/pretrained.json` (kind + module config), `OUT/params.msgpack` (the
Flax variables) and the tokenizer files; `load(OUT)` gives (module, variables) back and is
what a config's `model.*.pretrained` key names. `check` converts into a temporary
directory, loads it, runs the Flax module and the reference (transformers' torch
`CLIPModel` / `GPT2LMHeadModel`, taming's modules; the `parity` extra) on fixed random
inputs and prints one JSON line of max differences: absolute for states, embeddings and
images, relative to the reference's largest magnitude for logits. It exits 1 above
`--tolerance` (1e-4).
"""
import contextlib
import dataclasses
import io
import json
import pathlib
import shutil
import sys
import tempfile
from typing import Any, Mapping, Optional, Sequence, Union

from absl import app
from absl import flags
from absl import logging
import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from sd3_jax.data import schema
from sd3_jax.models import clip as clip_model
from sd3_jax.models import gpt2 as gpt2_model
from sd3_jax.models import taming_vqgan
from sd3_jax.scores import inception

PathLike = Union[str, pathlib.Path]
KINDS = ("clip", "gpt2", "vqgan")
MANIFEST = "pretrained.json"
PARAMS = "params.msgpack"
TOKENIZER_FILES = ("vocab.json", "merges.txt", "tokenizer.json", "tokenizer_config.json",
                   "special_tokens_map.json")
TOLERANCE = 1e-4


@dataclasses.dataclass
class Pretrained:
  kind: str
  module: nn.Module
  variables: dict
  directory: Optional[pathlib.Path] = None

  def tokenizer(self):
    """The HF fast tokenizer saved beside the weights (CLIP / GPT-2)."""
    return load_tokenizer(self.directory, self.kind)


# --- Reading sources ---------------------------------------------------------------------


def _read_json(path: pathlib.Path) -> dict:
  if not path.exists():
    raise schema.DataError("file not found", file=str(path))
  try:
    return json.loads(path.read_text())
  except json.JSONDecodeError as e:
    raise schema.DataError(f"bad JSON: {e}", file=str(path)) from e


def _hf_directory(src: PathLike, what: str) -> tuple[dict, dict, str]:
  """(config.json, the safetensors state dict, the weights file name) of a HF directory."""
  src = pathlib.Path(src)
  if not src.is_dir():
    raise schema.DataError(f"not a directory (need a HF {what} directory: config.json + "
                           "model.safetensors)", file=str(src))
  weights = src / "model.safetensors"
  if not weights.exists():
    raise schema.DataError(f"weights not found (a HF {what} directory saved with "
                           "safetensors)", file=str(weights))
  return _read_json(src / "config.json"), inception.load_state_dict(weights), str(weights)


def _filled(config: Mapping[str, Any], defaults: Mapping[str, Any]) -> dict:
  return {**defaults, **{k: config[k] for k in defaults if k in config}}


def _hf_key_map(strip_prefix: str = ""):
  """HF key -> ('params', Flax path, array): numbered ModuleList entries `x.3.` become
  `x_3`, torch linear weights are transposed (HF GPT-2's Conv1D already is [in, out])."""

  def key_map(key: str, value: np.ndarray):
    if strip_prefix and key.startswith(strip_prefix):
      key = key[len(strip_prefix):]
    parts = []
    for p in key.split("."):
      if p.isdigit() and parts:
        parts[-1] = f"{parts[-1]}_{p}"
      else:
        parts.append(p)
    *mod, leaf = parts
    if leaf == "weight":
      if value.ndim == 4:
        return "params", (*mod, "kernel"), value.transpose(2, 3, 1, 0)
      last = mod[-1]
      if last.endswith("embedding") or last in ("wte", "wpe", "embed"):
        return "params", (*mod, "embedding"), value
      if "norm" in last or "layrnorm" in last or last.startswith("ln_"):
        return "params", (*mod, "scale"), value
      if last in ("c_attn", "c_proj", "c_fc"):
        return "params", (*mod, "kernel"), value
      return "params", (*mod, "kernel"), value.T
    return "params", tuple(parts), value

  return key_map


def clip_from_hf(src: PathLike) -> tuple[clip_model.FlaxCLIP, dict]:
  config, state, source = _hf_directory(src, "CLIP")
  module = clip_model.model_from_config(config)
  variables = inception.convert_state_dict(state, module, _init_args("clip", module),
                                           key_map=_hf_key_map(),
                                           ignored_suffixes=("position_ids",), source=source)
  return module, variables


GPT2_DEFAULTS = dict(vocab_size=50257, n_positions=1024, n_embd=768, n_layer=12, n_head=12,
                     n_inner=None, activation_function="gelu_new", layer_norm_epsilon=1e-5,
                     scale_attn_weights=True, scale_attn_by_inverse_layer_idx=False,
                     bos_token_id=50256, eos_token_id=50256)


def gpt2_model_from_config(config: Mapping[str, Any]) -> gpt2_model.GPT2:
  cfg = _filled(config, GPT2_DEFAULTS)
  if cfg["activation_function"] not in gpt2_model.ACTIVATIONS:
    raise schema.DataError(f"unsupported activation {cfg['activation_function']!r}",
                           field="activation_function")
  if cfg["n_embd"] % cfg["n_head"]:
    raise schema.DataError(f"n_embd {cfg['n_embd']} is not a multiple of n_head "
                           f"{cfg['n_head']}", field="n_head")
  return gpt2_model.GPT2(cfg)


def gpt2_from_hf(src: PathLike) -> tuple[gpt2_model.GPT2, dict]:
  config, state, source = _hf_directory(src, "GPT-2")
  module = gpt2_model_from_config(config)
  # The LM head is tied to wte; attention-mask buffers are not weights.
  state = {k: v for k, v in state.items() if k != "lm_head.weight"
           and not k.endswith((".attn.bias", ".attn.masked_bias"))}
  variables = inception.convert_state_dict(state, module, _init_args("gpt2", module),
                                           key_map=_hf_key_map("transformer."), source=source)
  return module, variables


def read_taming_checkpoint(path: PathLike) -> dict[str, np.ndarray]:
  """The model tensors of a taming `.ckpt` (Lightning's `state_dict` wrapper, or a bare state
  dict), without the training loss' (discriminator, LPIPS) weights."""
  obj = inception.load_torch_object(path, lenient=True)
  if isinstance(obj, Mapping) and "state_dict" in obj:
    obj = obj["state_dict"]
  if not isinstance(obj, Mapping) or not obj:
    raise schema.DataError("no state dict (expected a taming checkpoint with a "
                           "'state_dict' entry)", file=str(path))
  return {str(k): np.asarray(v) for k, v in obj.items()
          if not str(k).startswith("loss.") and isinstance(v, np.ndarray)}


def _shape(state: Mapping[str, np.ndarray], key: str, source: str) -> tuple[int, ...]:
  if key not in state:
    raise schema.DataError("tensor missing: not a taming Gumbel VQGAN checkpoint",
                           file=source, field=key)
  return state[key].shape


def vqgan_config_from_state(state: Mapping[str, np.ndarray], source: str) -> dict:
  """The `GumbelVQGAN` fields from the checkpoint's tensor shapes (taming's ddconfig is not
  stored in it)."""
  ch, in_channels = _shape(state, "encoder.conv_in.weight", source)[:2]
  levels = sorted({int(k.split(".")[2]) for k in state if k.startswith("encoder.down.")})
  if not levels or levels != list(range(len(levels))):
    raise schema.DataError("no encoder.down.<i> levels", file=source, field="encoder.down")
  blocks = {int(k.split(".")[4]) for k in state if k.startswith("encoder.down.0.block.")}
  ch_mult = [_shape(state, f"encoder.down.{i}.block.0.conv1.weight", source)[0] // ch
             for i in levels]
  attn = [i for i in levels if f"encoder.down.{i}.attn.0.q.weight" in state]
  return dict(ch=int(ch), ch_mult=tuple(int(m) for m in ch_mult),
              num_res_blocks=len(blocks), attn_levels=tuple(attn),
              z_channels=int(_shape(state, "encoder.conv_out.weight", source)[0]),
              embed_dim=int(_shape(state, "quant_conv.weight", source)[0]),
              n_embed=int(_shape(state, "quantize.embed.weight", source)[0]),
              in_channels=int(in_channels),
              out_ch=int(_shape(state, "decoder.conv_out.weight", source)[0]))


def read_remapping(path: PathLike, n_embed: int) -> np.ndarray:
  """VQ-Diffusion's `full_to_quantize` [n_embed] (a `torch.save`d LongTensor, .npy also read)."""
  path = pathlib.Path(path)
  table = (np.load(path) if path.suffix == ".npy"
           else inception.load_torch_object(path))
  table = np.asarray(table)
  if table.shape != (n_embed,) or not np.issubdtype(table.dtype, np.integer):
    raise schema.DataError(f"remapping must be an integer vector of the VQGAN's {n_embed} "
                           f"codes; got {table.dtype} {table.shape}", file=str(path))
  if table.min() < 0:
    raise schema.DataError("remapping has negative ids", file=str(path))
  return table.astype(np.int32)


def quantize_to_full(full_to_quantize: np.ndarray) -> np.ndarray:
  """Kept id -> the first full code mapped to it (as VQ-Diffusion builds it)."""
  kept = int(full_to_quantize.max()) + 1
  out = np.full(kept, -1, np.int64)
  for full, q in enumerate(full_to_quantize):
    if out[q] == -1:
      out[q] = full
  if (out < 0).any():
    raise schema.DataError(f"remapping leaves kept ids {np.flatnonzero(out < 0)[:5]} with no "
                           "code", field="mapping")
  return out.astype(np.int32)


def vqgan_from_taming(ckpt: PathLike,
                      mapping: Optional[PathLike] = None) -> tuple[nn.Module, dict]:
  state = read_taming_checkpoint(ckpt)
  cfg = vqgan_config_from_state(state, str(ckpt))
  remap = None
  if mapping is not None:
    full_to_q = read_remapping(mapping, cfg["n_embed"])
    remap = {"full_to_quantize": full_to_q, "quantize_to_full": quantize_to_full(full_to_q)}
    cfg["quantize_number"] = len(remap["quantize_to_full"])
  module = taming_vqgan.GumbelVQGAN(**cfg)
  variables = inception.convert_state_dict(
      state, module, _init_args("vqgan", module), key_map=_hf_key_map(), source=str(ckpt),
      collections=("params",))
  if remap is None:
    identity = np.arange(cfg["n_embed"], dtype=np.int32)
    remap = {"full_to_quantize": identity, "quantize_to_full": identity}
  variables["remap"] = {k: jnp.asarray(v) for k, v in remap.items()}
  return module, variables


# --- Converted directories ---------------------------------------------------------------


def _module_config(kind: str, module: nn.Module) -> dict:
  if kind == "clip":
    return dict(text_config=dict(module.text_config), vision_config=dict(module.vision_config),
                projection_dim=module.projection_dim)
  if kind == "gpt2":
    return dict(module.cfg)
  return {f.name: getattr(module, f.name) for f in dataclasses.fields(module)
          if f.name not in ("parent", "name", "dtype")}


def _module_from_config(kind: str, config: Mapping[str, Any], dtype: Any = jnp.float32):
  if kind == "clip":
    return clip_model.FlaxCLIP(config["text_config"], config["vision_config"],
                               config["projection_dim"])
  if kind == "gpt2":
    return gpt2_model.GPT2(dict(config), dtype=dtype)
  fields = {k: tuple(v) if isinstance(v, list) else v for k, v in config.items()}
  return taming_vqgan.GumbelVQGAN(**fields, dtype=dtype)


def _init_args(kind: str, module: nn.Module) -> tuple:
  if kind == "clip":
    size = module.vision_config["image_size"]
    return (jnp.zeros((1, 8), jnp.int32), None, jnp.zeros((1, size, size, 3)))
  if kind == "gpt2":
    return (jnp.zeros((1, 4), jnp.int32),)
  size = 2 * module.downsample_factor
  return (jnp.zeros((1, size, size, module.in_channels)),)


def read_source(kind: str, src: PathLike, mapping: Optional[PathLike] = None):
  """(module, variables) from the original files of `kind`."""
  if kind not in KINDS:
    raise schema.DataError(f"unknown kind {kind!r}; one of {', '.join(KINDS)}", field="kind")
  if mapping is not None and kind != "vqgan":
    raise schema.DataError("--mapping is VQ-Diffusion's VQGAN code remapping (kind vqgan)",
                           field="mapping")
  if kind == "clip":
    return clip_from_hf(src)
  if kind == "gpt2":
    return gpt2_from_hf(src)
  return vqgan_from_taming(src, mapping)


def convert(kind: str, src: PathLike, out: PathLike,
            mapping: Optional[PathLike] = None) -> pathlib.Path:
  """Writes OUT/pretrained.json, OUT/params.msgpack and (CLIP, GPT-2) the tokenizer files."""
  module, variables = read_source(kind, src, mapping)
  out = pathlib.Path(out)
  out.mkdir(parents=True, exist_ok=True)
  (out / PARAMS).write_bytes(flax.serialization.msgpack_serialize(
      jax.tree.map(np.asarray, variables)))
  copied = []
  if kind in ("clip", "gpt2"):
    for name in TOKENIZER_FILES:
      if (pathlib.Path(src) / name).exists():
        shutil.copy(pathlib.Path(src) / name, out / name)
        copied.append(name)
    if "vocab.json" in copied and "tokenizer_config.json" not in copied:
      # Bare vocab + merges: name the class, so AutoTokenizer (data.tokenizer) loads this one.
      cls = {"clip": "CLIPTokenizer", "gpt2": "GPT2Tokenizer"}[kind]
      (out / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": cls}) + "\n")
      copied.append("tokenizer_config.json")
  manifest = dict(kind=kind, config=_module_config(kind, module), source=str(src),
                  mapping=None if mapping is None else str(mapping), tokenizer=copied)
  (out / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
  return out


def _manifest(directory: pathlib.Path, kind: Optional[str], field: Optional[str]) -> dict:
  manifest = _read_json(directory / MANIFEST)
  if manifest.get("kind") not in KINDS:
    raise schema.DataError(f"unknown kind {manifest.get('kind')!r}", file=str(directory / MANIFEST),
                           field=field)
  if kind is not None and manifest["kind"] != kind:
    raise schema.DataError(f"holds a {manifest['kind']!r} model, not {kind!r}",
                           file=str(directory / MANIFEST), field=field or "kind")
  return manifest


def module_of(directory: PathLike, kind: str, field: Optional[str] = None,
              dtype: Any = jnp.float32) -> nn.Module:
  """The (unbound) module a converted directory holds, without reading its weights;
  `field` is the config key that named the directory, for errors."""
  return _module_from_config(kind, _manifest(pathlib.Path(directory), kind, field)["config"],
                             dtype)


def load(directory: PathLike, kind: Optional[str] = None,
         dtype: Any = jnp.float32, field: Optional[str] = None) -> Pretrained:
  """A directory written by `convert` -> `Pretrained`; `kind` checks what it holds."""
  directory = pathlib.Path(directory)
  manifest = _manifest(directory, kind, field)
  kind = manifest["kind"]
  module = _module_from_config(kind, manifest["config"], dtype)
  target = jax.eval_shape(lambda: module.init(jax.random.PRNGKey(0), *_init_args(kind, module)))
  params = directory / PARAMS
  if not params.exists():
    raise schema.DataError("weights not found (write them with `python -m "
                           "sd3_jax.pretrained convert`)", file=str(params))
  state = flax.serialization.msgpack_restore(params.read_bytes())
  got = flax.traverse_util.flatten_dict(state)
  want = flax.traverse_util.flatten_dict(dict(target))
  for path, leaf in want.items():
    if path not in got or tuple(got[path].shape) != tuple(leaf.shape):
      raise schema.DataError(f"tensor {'/'.join(path)} is "
                             f"{'missing' if path not in got else tuple(got[path].shape)}; "
                             f"the model expects {tuple(leaf.shape)}", file=str(params))
  variables = flax.traverse_util.unflatten_dict(
      {p: jnp.asarray(got[p], want[p].dtype) for p in want})
  return Pretrained(kind, module, variables, directory)


def load_clip(directory: PathLike) -> tuple[clip_model.FlaxCLIP, dict]:
  """A CLIP from a HF directory or one written by `convert`."""
  if (pathlib.Path(directory) / MANIFEST).exists():
    pre = load(directory, "clip")
    return pre.module, pre.variables
  return clip_from_hf(directory)


def load_tokenizer(directory: PathLike, kind: str, field: Optional[str] = None):
  """The HF fast tokenizer (CLIP or GPT-2 BPE) from a HF or converted directory."""
  import transformers  # pylint: disable=import-outside-toplevel

  cls = {"clip": transformers.CLIPTokenizerFast, "gpt2": transformers.GPT2TokenizerFast}[kind]
  try:
    return cls.from_pretrained(str(directory))
  except Exception as e:  # pylint: disable=broad-except  # tokenizers raises bare Exception
    raise schema.DataError(f"no usable {kind} tokenizer files (vocab.json, merges.txt): {e}",
                           file=str(directory), field=field) from e


# --- Parity against the reference implementations -----------------------------------------


def _inputs(kind: str, module: nn.Module, seed: int) -> dict[str, np.ndarray]:
  """Fixed random inputs, batch 2 (a right-padded text in the second row)."""
  rng = np.random.default_rng(seed)
  if kind == "clip":
    t, v = module.text_config, module.vision_config
    length = min(12, t["max_position_embeddings"])
    ids = rng.integers(0, t["vocab_size"], (2, length))
    mask = np.ones((2, length), np.int64)
    mask[1, length // 2:] = 0
    size = v["image_size"]
    return dict(ids=ids, mask=mask, pixels=rng.normal(size=(2, size, size, 3)).astype(np.float32))
  if kind == "gpt2":
    c = module.cfg
    length = min(12, c["n_positions"] // 2)
    return dict(ids=rng.integers(0, c["vocab_size"], (2, length)),
                prefix=rng.normal(0, 0.5, (2, min(3, c["n_positions"] - length),
                                           c["n_embd"])).astype(np.float32))
  size = 4 * module.downsample_factor
  h = size // module.downsample_factor
  return dict(images=rng.uniform(-1, 1, (2, size, size, module.in_channels)).astype(np.float32),
              tokens=rng.integers(0, module.num_codes, (2, h, h)))


def flax_outputs(pre: Pretrained, x: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
  m, v = pre.module, pre.variables
  call = lambda method, *a: np.asarray(jax.jit(lambda *b: m.apply(v, *b, method=method))(*a))
  if pre.kind == "clip":
    ids, mask, pixels = jnp.asarray(x["ids"]), jnp.asarray(x["mask"]), jnp.asarray(x["pixels"])
    text = call(clip_model.FlaxCLIP.encode_text, ids, mask)
    image = call(clip_model.FlaxCLIP.encode_image, pixels)
    unit = lambda e: e / np.linalg.norm(e, axis=-1, keepdims=True)
    scale = np.exp(np.asarray(v["params"]["logit_scale"]))
    # CLIPModel's outputs: unit-normalised projections.
    return dict(text_embeds=unit(text), image_embeds=unit(image),
                text_states=call(clip_model.FlaxCLIP.text_states, ids, mask),
                image_states=call(clip_model.FlaxCLIP.image_states, pixels),
                logits=scale * unit(image) @ unit(text).T)
  if pre.kind == "gpt2":
    ids, prefix = jnp.asarray(x["ids"]), jnp.asarray(x["prefix"])
    return dict(logits=call(gpt2_model.GPT2.__call__, ids),
                hidden=call(gpt2_model.GPT2.hidden_states, ids),
                prefix_logits=call(lambda mod, i, p: mod(i, None, p), ids, prefix))
  images, tokens = jnp.asarray(x["images"]), jnp.asarray(x["tokens"])
  return dict(logits=call(taming_vqgan.GumbelVQGAN.logits, images),
              tokens=call(taming_vqgan.GumbelVQGAN.encode, images),
              decoded=call(taming_vqgan.GumbelVQGAN.decode_indices, tokens))


def _taming_reference(pre: Pretrained, ckpt: PathLike, mapping: Optional[PathLike]):
  """taming's Encoder / Decoder / GumbelQuantize, as VQ-Diffusion's TamingGumbelVQVAE uses
  them, loaded with torch from the checkpoint itself."""
  # pylint: disable=import-outside-toplevel
  import torch
  from taming.modules.diffusionmodules import model as taming_model
  from taming.modules.vqvae import quantize as taming_quantize

  m = pre.module
  resolution = 16 * m.downsample_factor
  dd = dict(ch=m.ch, out_ch=m.out_ch, ch_mult=tuple(m.ch_mult), num_res_blocks=m.num_res_blocks,
            attn_resolutions=[resolution // 2 ** i for i in m.attn_levels], dropout=0.0,
            in_channels=m.in_channels, resolution=resolution, z_channels=m.z_channels,
            double_z=False)
  net = torch.nn.Module()
  net.encoder = taming_model.Encoder(**dd)
  with contextlib.redirect_stdout(io.StringIO()):  # taming prints the latent shape
    net.decoder = taming_model.Decoder(**dd)
  net.quant_conv = torch.nn.Conv2d(m.z_channels, m.embed_dim, 1)
  net.post_quant_conv = torch.nn.Conv2d(m.embed_dim, m.z_channels, 1)
  net.quantize = taming_quantize.GumbelQuantize(m.z_channels, m.embed_dim, m.n_embed)
  try:
    ckpt_obj = torch.load(str(ckpt), map_location="cpu", weights_only=True)
  except Exception:  # pylint: disable=broad-except  # Lightning extras need full unpickling
    ckpt_obj = torch.load(str(ckpt), map_location="cpu", weights_only=False)
  state = ckpt_obj.get("state_dict", ckpt_obj)
  net.load_state_dict({k: w for k, w in state.items() if not k.startswith("loss.")})
  net.eval()
  if mapping is not None:
    full_to_q = torch.load(str(mapping), map_location="cpu")
    q_to_full = torch.zeros(int(full_to_q.max()) + 1, dtype=torch.long) - 1
    for idx, i in enumerate(full_to_q):
      if q_to_full[i] == -1:
        q_to_full[i] = idx
  else:
    full_to_q = q_to_full = torch.arange(m.n_embed)
  return net, full_to_q, q_to_full


def reference_outputs(pre: Pretrained, src: PathLike, x: Mapping[str, np.ndarray],
                      mapping: Optional[PathLike] = None) -> dict[str, np.ndarray]:
  """The same outputs from the reference implementation, in the Flax layout."""
  import torch  # pylint: disable=import-outside-toplevel
  import transformers  # pylint: disable=import-outside-toplevel

  transformers.utils.logging.set_verbosity_error()  # its notes on tiny test configs
  transformers.utils.logging.disable_progress_bar()
  with torch.no_grad():
    if pre.kind == "clip":
      ref = transformers.CLIPModel.from_pretrained(str(src)).eval()
      out = ref(input_ids=torch.as_tensor(x["ids"]), attention_mask=torch.as_tensor(x["mask"]),
                pixel_values=torch.as_tensor(x["pixels"]).permute(0, 3, 1, 2))
      return dict(text_embeds=out.text_embeds.numpy(), image_embeds=out.image_embeds.numpy(),
                  text_states=out.text_model_output.last_hidden_state.numpy(),
                  image_states=out.vision_model_output.last_hidden_state.numpy(),
                  logits=out.logits_per_image.numpy())
    if pre.kind == "gpt2":
      ref = transformers.GPT2LMHeadModel.from_pretrained(str(src)).eval()
      ids = torch.as_tensor(x["ids"])
      out = ref(input_ids=ids, output_hidden_states=True)
      embeds = torch.cat([torch.as_tensor(x["prefix"]), ref.transformer.wte(ids)], 1)
      with_prefix = ref(inputs_embeds=embeds).logits[:, x["prefix"].shape[1]:]
      return dict(logits=out.logits.numpy(), hidden=out.hidden_states[-1].numpy(),
                  prefix_logits=with_prefix.numpy())
    net, full_to_q, q_to_full = _taming_reference(pre, src, mapping)
    images = torch.as_tensor(x["images"]).permute(0, 3, 1, 2)
    logits = net.quantize.proj(net.quant_conv(net.encoder(images)))
    tokens = full_to_q[logits.argmax(1)]
    full = q_to_full[torch.as_tensor(x["tokens"])]
    one_hot = torch.nn.functional.one_hot(full, net.quantize.n_embed).permute(0, 3, 1, 2)
    z = torch.einsum("bnhw,nd->bdhw", one_hot.float(), net.quantize.embed.weight)
    decoded = torch.clamp(net.decoder(net.post_quant_conv(z)), -1.0, 1.0)
    return dict(logits=logits.permute(0, 2, 3, 1).numpy(), tokens=tokens.numpy(),
                decoded=decoded.permute(0, 2, 3, 1).numpy())


RELATIVE = ("logits", "prefix_logits")


def check(kind: str, src: PathLike, mapping: Optional[PathLike] = None, seed: int = 0,
          tolerance: float = TOLERANCE) -> dict[str, Any]:
  """Converts `src`, loads the result and compares it with the reference implementation."""
  with tempfile.TemporaryDirectory() as tmp:
    pre = load(convert(kind, src, tmp, mapping), kind)
    x = _inputs(kind, pre.module, seed)
    got = flax_outputs(pre, x)
  want = reference_outputs(pre, src, x, mapping)
  diffs, ok = {}, True
  for name, ref in want.items():
    if name == "tokens":
      diffs["tokens_mismatch"] = float(np.mean(got[name] != ref))
      ok &= diffs["tokens_mismatch"] == 0.0
      continue
    err = float(np.max(np.abs(got[name].astype(np.float64) - ref)))
    if name in RELATIVE:
      err /= max(float(np.max(np.abs(ref))), 1e-12)
      name = f"{name}_relative"
    diffs[name] = err
    ok &= err <= tolerance
  params = sum(np.size(p) for p in jax.tree.leaves(pre.variables["params"]))
  return dict(kind=kind, src=str(src), params=int(params), max_diff=diffs,
              tolerance=tolerance, ok=bool(ok))


# --- CLI -----------------------------------------------------------------------------------

flags.DEFINE_enum("kind", None, KINDS, "What the source holds.")
flags.DEFINE_string("src", None, "HF directory (clip, gpt2) or taming .ckpt (vqgan).")
flags.DEFINE_string("out", None, "convert: the directory to write.")
flags.DEFINE_string("mapping", None, "vqgan: VQ-Diffusion's code remapping (.pt or .npy).")
flags.DEFINE_float("tolerance", TOLERANCE, "check: the largest difference that passes.")
flags.DEFINE_integer("seed", 0, "check: the random inputs' seed.")


def main(argv: Sequence[str]) -> int:
  f = flags.FLAGS
  logging.set_verbosity(logging.WARNING)
  if len(argv) != 2 or argv[1] not in ("convert", "check"):
    raise app.UsageError("usage: python -m sd3_jax.pretrained {convert,check} --kind KIND "
                         "--src PATH [--out DIR] [--mapping FILE]")
  try:
    if not f.kind or not f.src:
      raise schema.DataError("--kind and --src are required", field="kind/src")
    if argv[1] == "convert":
      if not f.out:
        raise schema.DataError("convert needs --out DIR", field="out")
      out = convert(f.kind, f.src, f.out, f.mapping)
      print(json.dumps(dict(kind=f.kind, src=f.src, out=str(out))))
      return 0
    result = check(f.kind, f.src, f.mapping, f.seed, f.tolerance)
  except schema.DataError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  print(json.dumps(result))
  return 0 if result["ok"] else 1


if __name__ == "__main__":
  app.run(lambda argv: sys.exit(main(argv)))
