"""The in-project image tokenizer: a convolutional VQ-VAE with an EMA-VQ or FSQ quantiser.

Images [B, H, W, C] in [-1, 1] go through `len(channel_mults)` stride-2 down blocks
(64×64 with three blocks -> 8×8 tokens), a quantiser, and a mirrored decoder ending in
tanh. Two quantisers:

* EMA vector quantisation (VQ-VAE-2 / sonnet `VectorQuantizerEMA`): the codebook is not a
  parameter but an exponential moving average of the encoder outputs assigned to each code,
  kept with its statistics in the mutable `'vq_stats'` collection. Codes unused for
  `dead_code_steps` consecutive training steps are restarted from random encoder outputs
  of the current batch. Loss = reconstruction loss + β·commitment.
* FSQ (`fsq.FSQ`, paper eq. 20): no codebook, no commitment loss; ids are mixed radix.

The reconstruction loss (`reconstruction_loss`) is a per-pixel weighted MSE (+ optional L1):
in rendered scenes the coloured objects are a few percent of the pixels, so a plain MSE is
dominated by the flat background and blurs exactly what carries the scene (object hues and
the bottom rows that fix each object's ground contact). `object_weight` up-weights pixels
that are saturated in the target, and their 1-pixel neighbourhood (the object boundary).

`decode_codes` accepts the decoder's input [B, h, w, decoder_input_dim] so the graph-fused
decoder G_V (paper eq. 4–5) can put a 1×1 adapter in front of it.
"""
from typing import Any, Dict, Optional, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from sd3_jax.models import fsq as fsq_lib
from sd3_jax.models.layers import conv_kernel_init, ones_init, zeros_init

Array = jax.Array
Dtype = Any

_CONV_NAMES = ("conv_h", "conv_w", "conv_in", "conv_out")


def _conv(features: int, kernel: int, stride: int = 1, dtype: Dtype = jnp.float32,
          param_dtype: Dtype = jnp.float32, name: Optional[str] = None) -> nn.Conv:
  return nn.Conv(features, (kernel, kernel), strides=(stride, stride), padding="SAME",
                 dtype=dtype, param_dtype=param_dtype, kernel_init=conv_kernel_init(_CONV_NAMES),
                 bias_init=zeros_init(("conv_out",)), name=name)


def _norm(groups: int, channels: int, dtype: Dtype, param_dtype: Dtype, name: str):
  # GroupNorm needs channels % groups == 0; fall back to fewer groups for tiny models.
  while channels % groups:
    groups -= 1
  return nn.GroupNorm(num_groups=groups, dtype=dtype, param_dtype=param_dtype,
                      scale_init=ones_init(("conv_out",)), bias_init=zeros_init(("conv_out",)),
                      name=name)


class ResBlock(nn.Module):
  """GroupNorm-SiLU-Conv ×2 with a (1×1-projected) skip."""
  features: int
  norm_groups: int = 8
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    y = nn.silu(_norm(self.norm_groups, x.shape[-1], name="norm1", **kw)(x))
    y = _conv(self.features, 3, name="conv1", **kw)(y)
    y = nn.silu(_norm(self.norm_groups, self.features, name="norm2", **kw)(y))
    y = _conv(self.features, 3, name="conv2", **kw)(y)
    if x.shape[-1] != self.features:
      x = _conv(self.features, 1, name="skip", **kw)(x)
    return x + y


class Encoder(nn.Module):
  """Pixels [B, H, W, C] -> latents [B, H/2^n, W/2^n, out_dim]."""
  out_dim: int
  base_channels: int = 32
  channel_mults: Sequence[int] = (1, 2, 2)
  num_res_blocks: int = 1
  norm_groups: int = 8
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    x = _conv(self.base_channels, 3, name="conv_in", **kw)(x.astype(self.dtype))
    for i, mult in enumerate(self.channel_mults):
      ch = self.base_channels * mult
      for j in range(self.num_res_blocks):
        x = ResBlock(ch, self.norm_groups, **kw, name=f"down{i}_res{j}")(x)
      x = _conv(ch, 4, stride=2, name=f"down{i}", **kw)(x)
    ch = x.shape[-1]
    x = ResBlock(ch, self.norm_groups, **kw, name="mid_res")(x)
    x = nn.silu(_norm(self.norm_groups, ch, name="norm_out", **kw)(x))
    return _conv(self.out_dim, 1, name="conv_out", **kw)(x)


class Decoder(nn.Module):
  """Latents [B, h, w, D] -> pixels [B, h·2^n, w·2^n, out_channels] in [-1, 1]."""
  out_channels: int = 3
  base_channels: int = 32
  channel_mults: Sequence[int] = (1, 2, 2)
  num_res_blocks: int = 1
  norm_groups: int = 8
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, z: Array) -> Array:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    ch = self.base_channels * self.channel_mults[-1]
    x = _conv(ch, 3, name="conv_in", **kw)(z.astype(self.dtype))
    x = ResBlock(ch, self.norm_groups, **kw, name="mid_res")(x)
    for i, mult in reversed(list(enumerate(self.channel_mults))):
      ch = self.base_channels * mult
      b, h, w, c = x.shape
      x = jax.image.resize(x, (b, 2 * h, 2 * w, c), "nearest")
      x = _conv(ch, 3, name=f"up{i}", **kw)(x)
      for j in range(self.num_res_blocks):
        x = ResBlock(ch, self.norm_groups, **kw, name=f"up{i}_res{j}")(x)
    x = nn.silu(_norm(self.norm_groups, x.shape[-1], name="norm_out", **kw)(x))
    x = _conv(self.out_channels, 3, name="conv_out", **kw)(x)
    return jnp.tanh(x.astype(jnp.float32))


class EMAQuantizer(nn.Module):
  """EMA vector quantiser with dead-code restart; state in the `'vq_stats'` collection.

  `vq_stats` holds `codebook` [K, D], `cluster_size` [K] and `embed_sum` [K, D] (the EMAs),
  `unused_steps` [K] (consecutive training steps without an assignment) and `step`.
  """
  codebook_size: int
  embed_dim: int
  decay: float = 0.99
  epsilon: float = 1e-5
  dead_code_steps: int = 20

  def setup(self):
    k, d = self.codebook_size, self.embed_dim
    init = lambda key: jax.random.normal(key, (k, d)) / jnp.sqrt(d)  # noqa: E731
    self.codebook = self.variable(
        "vq_stats", "codebook",
        lambda: nn.LogicallyPartitioned(init(self.make_rng("params")), ("vocab", "embed")))
    self.embed_sum = self.variable(
        "vq_stats", "embed_sum", lambda: nn.LogicallyPartitioned(self.codebook.value,
                                                        ("vocab", "embed")))
    self.cluster_size = self.variable(
        "vq_stats", "cluster_size", lambda: nn.LogicallyPartitioned(jnp.ones((k,)), ("vocab",)))
    self.unused_steps = self.variable(
        "vq_stats", "unused_steps", lambda: nn.LogicallyPartitioned(jnp.zeros((k,), jnp.int32),
                                                           ("vocab",)))
    self.step = self.variable("vq_stats", "step", lambda: jnp.zeros((), jnp.int32))

  def lookup(self, indices: Array) -> Array:
    return jnp.take(self.codebook.value, indices, axis=0)

  def __call__(self, z: Array, train: bool) -> Tuple[Array, Array, Dict[str, Array]]:
    """z [..., D] -> (straight-through z_q [..., D], indices [...], aux).

    In training (and not while initialising) the EMA statistics are updated with the
    batch's assignments and dead codes are restarted; the returned z_q uses the codebook
    from before the update.
    """
    flat = z.reshape(-1, self.embed_dim).astype(jnp.float32)
    codebook = self.codebook.value
    dist = (jnp.sum(flat ** 2, -1, keepdims=True) - 2 * flat @ codebook.T
            + jnp.sum(codebook ** 2, -1)[None, :])
    idx = jnp.argmin(dist, axis=-1)
    z_q = jnp.take(codebook, idx, axis=0)
    commitment = jnp.mean((flat - jax.lax.stop_gradient(z_q)) ** 2)
    counts = jnp.bincount(idx, length=self.codebook_size).astype(jnp.float32)
    if train and not self.is_initializing():
      self._ema_update(jax.lax.stop_gradient(flat), idx, counts)
    z_q = flat + jax.lax.stop_gradient(z_q - flat)
    aux = {"commitment": commitment, **usage_stats(counts)}
    return z_q.reshape(z.shape), idx.reshape(z.shape[:-1]), aux

  def _ema_update(self, flat: Array, idx: Array, counts: Array):
    k = self.codebook_size
    onehot = jax.nn.one_hot(idx, k, dtype=flat.dtype)
    cluster_size = self.decay * self.cluster_size.value + (1 - self.decay) * counts
    embed_sum = self.decay * self.embed_sum.value + (1 - self.decay) * (onehot.T @ flat)
    # Laplace smoothing keeps rarely used codes from dividing by ~0.
    n = jnp.sum(cluster_size)
    smoothed = (cluster_size + self.epsilon) / (n + k * self.epsilon) * n
    codebook = embed_sum / smoothed[:, None]

    unused = jnp.where(counts > 0, 0, self.unused_steps.value + 1)
    dead = unused >= self.dead_code_steps
    if self.has_rng("vq"):
      key = self.make_rng("vq")
    else:
      key = jax.random.fold_in(jax.random.key(0), self.step.value)
    candidates = jnp.take(flat, jax.random.randint(key, (k,), 0, flat.shape[0]), axis=0)
    self.codebook.value = jnp.where(dead[:, None], candidates, codebook)
    self.embed_sum.value = jnp.where(dead[:, None], candidates, embed_sum)
    self.cluster_size.value = jnp.where(dead, 1.0, cluster_size)
    self.unused_steps.value = jnp.where(dead, 0, unused)
    self.step.value = self.step.value + 1


def object_mask(images: Array, min_saturation: float = 0.3) -> Array:
  """images [B, H, W, 3] in [-1, 1] -> float {0, 1} [B, H, W]: saturated pixels, dilated
  by one pixel (3×3) so the object's outline and the ground just below it count too.

  The scene renders' sky and grounds have saturation < 0.3 and the palette colours ~1.
  """
  x = (images.astype(jnp.float32) + 1.0) * 0.5
  mx, mn = jnp.max(x, -1), jnp.min(x, -1)
  sat = (mx - mn) / jnp.maximum(mx, 1e-3)
  mask = (sat >= min_saturation).astype(jnp.float32)
  return jax.lax.reduce_window(mask, 0.0, jax.lax.max, (1, 3, 3), (1, 1, 1), "SAME")


def reconstruction_loss(recon: Array, images: Array, object_weight: float = 1.0,
                        l1_weight: float = 0.0) -> Array:
  """Mean over pixels of w·(MSE + l1_weight·|err|), w = object_weight on `object_mask`
  pixels and 1 elsewhere (the plain MSE when object_weight=1, l1_weight=0)."""
  images = images.astype(jnp.float32)
  err = recon.astype(jnp.float32) - images
  per_pixel = jnp.mean(err ** 2, -1)
  if l1_weight:
    per_pixel = per_pixel + l1_weight * jnp.mean(jnp.abs(err), -1)
  if object_weight == 1.0:
    return jnp.mean(per_pixel)
  weight = 1.0 + (object_weight - 1.0) * object_mask(images)
  return jnp.mean(weight * per_pixel)


def usage_stats(counts: Array) -> Dict[str, Array]:
  """Codebook usage (fraction of codes hit) and perplexity exp(H(p)) from code counts."""
  p = counts / jnp.maximum(jnp.sum(counts), 1.0)
  entropy = -jnp.sum(jnp.where(p > 0, p * jnp.log(jnp.where(p > 0, p, 1.0)), 0.0))
  return {"usage": jnp.mean(counts > 0), "perplexity": jnp.exp(entropy)}


class VQVAE(nn.Module):
  """Convolutional VQ-VAE; tokens on a (H/2^n)×(W/2^n) grid, n = len(channel_mults).

  Attributes:
    quantizer: 'ema' (codebook of `codebook_size` × `embed_dim`) or 'fsq' (`fsq_levels`,
      ∏ levels codes, latent dim len(fsq_levels)).
    commitment_cost: β of the commitment term (EMA only).
    object_weight, l1_weight: reconstruction loss weights (see `reconstruction_loss`).
    ema_decay, dead_code_steps: EMA decay and restart patience (training steps).
  """
  in_channels: int = 3
  base_channels: int = 32
  channel_mults: Sequence[int] = (1, 2, 2)
  num_res_blocks: int = 1
  norm_groups: int = 8
  quantizer: str = "ema"
  codebook_size: int = 512
  embed_dim: int = 64
  fsq_levels: Sequence[int] = (8, 5, 5, 5)
  commitment_cost: float = 0.25
  ema_decay: float = 0.99
  dead_code_steps: int = 20
  object_weight: float = 1.0
  l1_weight: float = 0.0
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  def setup(self):
    if self.quantizer not in ("ema", "fsq"):
      raise ValueError(f"quantizer must be 'ema' or 'fsq', got {self.quantizer!r}")
    kw = dict(base_channels=self.base_channels, channel_mults=tuple(self.channel_mults),
              num_res_blocks=self.num_res_blocks, norm_groups=self.norm_groups,
              dtype=self.dtype, param_dtype=self.param_dtype)
    self.encoder = Encoder(out_dim=self.decoder_input_dim, **kw)
    self.decoder = Decoder(out_channels=self.in_channels, **kw)
    if self.quantizer == "ema":
      self.vq = EMAQuantizer(self.codebook_size, self.embed_dim, self.ema_decay,
                             dead_code_steps=self.dead_code_steps)
    else:
      self.fsq = fsq_lib.FSQ(tuple(self.fsq_levels))

  @property
  def decoder_input_dim(self) -> int:
    """Channels of the quantised latents that `decode_codes` takes."""
    return self.embed_dim if self.quantizer == "ema" else len(self.fsq_levels)

  @property
  def num_codes(self) -> int:
    """Size of the token vocabulary (without any [MASK])."""
    return (self.codebook_size if self.quantizer == "ema"
            else fsq_lib.FSQ(tuple(self.fsq_levels)).codebook_size)

  @property
  def downsample_factor(self) -> int:
    return 2 ** len(self.channel_mults)

  def decoder_module(self, dtype: Dtype = jnp.float32,
                     param_dtype: Dtype = jnp.float32) -> nn.Module:
    """A fresh copy of the latents -> images network (G_V wraps one, paper eq. 5)."""
    return Decoder(out_channels=self.in_channels, base_channels=self.base_channels,
                   channel_mults=tuple(self.channel_mults), num_res_blocks=self.num_res_blocks,
                   norm_groups=self.norm_groups, dtype=dtype, param_dtype=param_dtype,
                   parent=None)  # unbound: the caller adopts it

  @staticmethod
  def decoder_params(params: Any) -> Any:
    """The `decoder_module` parameters inside this model's `params`."""
    if "decoder" not in params:
      raise ValueError("vqvae_params has no 'decoder' subtree (pass the VQVAE's 'params')")
    return params["decoder"]

  def quantize(self, z: Array, train: bool = False) -> Tuple[Array, Array, Dict[str, Array]]:
    """Encoder output [B, h, w, D] -> (z_q, indices [B, h, w], aux)."""
    if self.quantizer == "ema":
      return self.vq(z, train)
    codes = self.fsq.quantize(z)
    idx = self.fsq.codes_to_indices(codes)
    counts = jnp.bincount(idx.reshape(-1), length=self.fsq.codebook_size)
    aux = {"commitment": jnp.zeros(()), **usage_stats(counts.astype(jnp.float32))}
    return self.fsq.normalize(codes), idx, aux

  def encode(self, images: Array) -> Array:
    """images [B, H, W, C] in [-1, 1] -> int32 token ids [B, h, w]."""
    _, idx, _ = self.quantize(self.encoder(images), train=False)
    return idx.astype(jnp.int32)

  def indices_to_latents(self, indices: Array) -> Array:
    """ids [B, h, w] -> quantised latents [B, h, w, decoder_input_dim]."""
    if self.quantizer == "ema":
      return self.vq.lookup(indices)
    return self.fsq.normalize(self.fsq.indices_to_codes(indices))

  def decode_codes(self, z: Array) -> Array:
    """Quantised latents [B, h, w, decoder_input_dim] -> images [B, H, W, C] in [-1, 1]."""
    return self.decoder(z)

  def decode_indices(self, indices: Array) -> Array:
    """Token ids [B, h, w] -> images [B, H, W, C] in [-1, 1]."""
    return self.decoder(self.indices_to_latents(indices))

  def __call__(self, images: Array, train: bool = False) -> Tuple[Array, Dict[str, Array]]:
    """images [B, H, W, C] in [-1, 1] -> (reconstruction, aux).

    aux: `loss` (= `reconstruction_loss` + β·commitment), `recon_mse` (plain MSE),
    `commitment`, `usage`, `perplexity`, `indices` [B, h, w].
    """
    z = self.encoder(images)
    z_q, idx, aux = self.quantize(z, train)
    recon = self.decoder(z_q)
    mse = jnp.mean((recon - images.astype(jnp.float32)) ** 2)
    rec_loss = reconstruction_loss(recon, images, self.object_weight, self.l1_weight)
    aux = dict(aux, recon_mse=mse, indices=idx,
               loss=rec_loss + self.commitment_cost * aux["commitment"])
    return recon, aux


def vqvae_loss(model: VQVAE, params: Any, state: Any, images: Array,
               rng: Optional[Array] = None) -> Tuple[Array, Tuple[Any, Dict[str, Array]]]:
  """Pure training loss for `jax.value_and_grad(..., argnums=1, has_aux=True)`.

  Args:
    model: the VQVAE.
    params: its `'params'`.
    state: the `'vq_stats'` collection ({} for FSQ).
    images: [B, H, W, C] in [-1, 1].
    rng: key for dead-code restarts (default: derived from the stored step counter).

  Returns:
    (loss, (new_state, scalar metrics)).
  """
  variables = {"params": params}
  if state:
    variables["vq_stats"] = state
  rngs = {"vq": rng} if rng is not None else {}
  (_, aux), updates = model.apply(variables, images, train=True, rngs=rngs,
                                  mutable=["vq_stats"])
  metrics = {k: v for k, v in aux.items() if k != "indices"}
  return aux["loss"], (updates.get("vq_stats", state), metrics)
