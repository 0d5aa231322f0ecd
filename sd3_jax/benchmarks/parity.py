r"""Parity of the Flax CLIP, GPT-2 and VQGAN with their reference implementations, on small
random reference models of several configs each (no checkpoint is downloaded).

COMMAND (the `parity` extra, plus `pip install --no-deps taming-transformers-rom1504==0.0.6`):
  python -m sd3_jax.benchmarks.parity [--out=DIR] [--released]

For every config it builds the reference model with random weights (transformers' torch
`CLIPModel` / `GPT2LMHeadModel`, taming's Encoder/Decoder/GumbelQuantize), saves it in the
standard format (HF safetensors directory, Lightning-style `.ckpt` + remapping `.pt`), and
runs `sd3_jax.pretrained.check` on it: convert, load, compare on fixed random inputs. Prints
one row per config with the max difference per output (absolute; relative for logits). On
real checkpoints run `python -m sd3_jax.pretrained check --kind KIND --src PATH` instead.
The tests use the same configs. `--released` adds the released sizes with random weights
(CLIP ViT-B/32, GPT-2 124M, VQ-Diffusion's f8 VQGAN with 8,192 codes remapped to 2,887):
the same code at full depth and width, a few minutes on a CPU.
"""
import argparse
import contextlib
import io
import json
import pathlib
import sys
import tempfile
from typing import Optional, Sequence

CLIP_CONFIGS = {
    # legacy eos id 2: pooled at the highest id
    "legacy_eos": dict(
        text_config=dict(vocab_size=99, hidden_size=32, intermediate_size=37,
                         num_hidden_layers=2, num_attention_heads=4,
                         max_position_embeddings=16, eos_token_id=2),
        vision_config=dict(hidden_size=24, intermediate_size=40, num_hidden_layers=2,
                           num_attention_heads=3, image_size=32, patch_size=8),
        projection_dim=16),
    # explicit eos id, exact GELU, 6x6 patches
    "gelu_eos": dict(
        text_config=dict(vocab_size=64, hidden_size=16, intermediate_size=24,
                         num_hidden_layers=1, num_attention_heads=2,
                         max_position_embeddings=20, hidden_act="gelu", eos_token_id=63),
        vision_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=3,
                           num_attention_heads=4, image_size=24, patch_size=6,
                           hidden_act="gelu"),
        projection_dim=8),
    "wide": dict(
        text_config=dict(vocab_size=120, hidden_size=48, intermediate_size=64,
                         num_hidden_layers=3, num_attention_heads=6,
                         max_position_embeddings=12, layer_norm_eps=1e-6),
        vision_config=dict(hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                           num_attention_heads=2, image_size=16, patch_size=4,
                           layer_norm_eps=1e-6),
        projection_dim=24),
}
GPT2_CONFIGS = {
    "base": dict(vocab_size=101, n_positions=32, n_embd=32, n_layer=2, n_head=4),
    "inner_gelu_invscale": dict(vocab_size=77, n_positions=24, n_embd=24, n_layer=3, n_head=2,
                                n_inner=40, activation_function="gelu",
                                scale_attn_by_inverse_layer_idx=True),
    "relu_unscaled": dict(vocab_size=50, n_positions=20, n_embd=16, n_layer=1, n_head=4,
                          activation_function="relu", scale_attn_weights=False,
                          layer_norm_epsilon=1e-6),
}
# taming ddconfig (z_channels = embed_dim, as GumbelVQ needs), n_embed, kept codes (0: none)
VQGAN_CONFIGS = {
    "remap": (dict(ch=32, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=[8],
                   resolution=16, z_channels=32), 64, 20),
    "deep": (dict(ch=32, ch_mult=(1, 1, 2), num_res_blocks=2, attn_resolutions=[4],
                  resolution=16, z_channels=64), 48, 0),
    "no_attn": (dict(ch=64, ch_mult=(1, 2, 2, 1), num_res_blocks=1, attn_resolutions=[],
                     resolution=32, z_channels=32), 100, 37),
}


def save_hf(kind: str, config: dict, directory: pathlib.Path, seed: int = 0) -> pathlib.Path:
  """A random HF CLIPModel / GPT2LMHeadModel of `config` saved (safetensors) in `directory`."""
  import torch  # pylint: disable=import-outside-toplevel
  import transformers  # pylint: disable=import-outside-toplevel
  transformers.utils.logging.set_verbosity_error()
  transformers.utils.logging.disable_progress_bar()
  torch.manual_seed(seed)
  if kind == "clip":
    model = transformers.CLIPModel(transformers.CLIPConfig(**config))
  else:
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(**config))
  model.save_pretrained(str(directory))
  return directory


def save_taming(ddconfig: dict, n_embed: int, kept: int, directory: pathlib.Path,
                seed: int = 0):
  """A random taming Gumbel VQGAN as a Lightning-style `.ckpt` (the training loss' weights
  and optimizer state ride along, as in a real one) and, with `kept`, a remapping `.pt`.
  -> (ckpt path, mapping path or None, the torch module)."""
  import torch  # pylint: disable=import-outside-toplevel
  from taming.modules.diffusionmodules import model as tm  # pylint: disable=import-outside-toplevel
  from taming.modules.vqvae import quantize as tq  # pylint: disable=import-outside-toplevel
  torch.manual_seed(seed)
  full = dict(ddconfig, out_ch=3, in_channels=3, dropout=0.0, double_z=False)
  net = torch.nn.Module()
  with contextlib.redirect_stdout(io.StringIO()):  # taming prints the latent shape
    net.encoder, net.decoder = tm.Encoder(**full), tm.Decoder(**full)
  z = ddconfig["z_channels"]
  net.quant_conv, net.post_quant_conv = torch.nn.Conv2d(z, z, 1), torch.nn.Conv2d(z, z, 1)
  net.quantize = tq.GumbelQuantize(z, z, n_embed)
  net.loss = torch.nn.Linear(3, 3)
  directory.mkdir(parents=True, exist_ok=True)
  ckpt = directory / "last.ckpt"
  torch.save({"state_dict": net.state_dict(), "epoch": 7, "global_step": 1234,
              "optimizer_states": [{"lr": 1e-4}]}, str(ckpt))
  mapping = None
  if kept:
    table = torch.randint(0, kept, (n_embed,))
    table[:kept] = torch.arange(kept)  # every kept id has a code
    mapping = directory / "remap.pt"
    torch.save(table, str(mapping))
  return ckpt, mapping, net


# HF's defaults are openai/clip-vit-base-patch32 and gpt2; taming_f8_8192_openimages.yaml.
RELEASED = {
    "clip": {"vit-b-32": dict(text_config={}, vision_config={})},
    "gpt2": {"124M": {}},
    "vqgan": {"f8-8192-to-2887": (dict(ch=128, ch_mult=(1, 1, 2, 4), num_res_blocks=2,
                                       attn_resolutions=[32], resolution=256,
                                       z_channels=256), 8192, 2887)},
}


def run_all(root: pathlib.Path, released: bool = False) -> list[dict]:
  from sd3_jax import pretrained  # pylint: disable=import-outside-toplevel
  rows = []
  clip, gpt2, vqgan = dict(CLIP_CONFIGS), dict(GPT2_CONFIGS), dict(VQGAN_CONFIGS)
  if released:
    clip.update(RELEASED["clip"])
    gpt2.update(RELEASED["gpt2"])
    vqgan.update(RELEASED["vqgan"])
  for kind, configs in (("clip", clip), ("gpt2", gpt2)):
    for name, config in configs.items():
      result = pretrained.check(kind, save_hf(kind, config, root / f"{kind}_{name}"))
      rows.append(dict(result, config=name))
  for name, (dd, n_embed, kept) in vqgan.items():
    ckpt, mapping, _ = save_taming(dd, n_embed, kept, root / f"vqgan_{name}")
    rows.append(dict(pretrained.check("vqgan", ckpt, mapping), config=name))
  return rows


def main(argv: Optional[Sequence[str]] = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--out", help="keep the reference models here (default: a temp dir)")
  parser.add_argument("--released", action="store_true",
                      help="also the released sizes (random weights)")
  args = parser.parse_args(argv)
  with tempfile.TemporaryDirectory() as tmp:
    rows = run_all(pathlib.Path(args.out or tmp), args.released)
  print("| kind | config | params | max difference per output | ok |")
  print("|---|---|---|---|---|")
  for r in rows:
    diffs = ", ".join(f"{k} {v:.1e}" for k, v in r["max_diff"].items())
    print(f"| {r['kind']} | {r['config']} | {r['params']:,} | {diffs} | {r['ok']} |")
  print(json.dumps({"all_ok": all(r["ok"] for r in rows), "configs": len(rows)}))
  return 0 if all(r["ok"] for r in rows) else 1


if __name__ == "__main__":
  sys.exit(main())
