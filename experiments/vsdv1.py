r"""SD³ on VSDv1 at the paper's scale (256×256 images, VQ-Diffusion-sized denoisers).

COMMAND (a TPU VM pod / GPU node; VSD and any local files must be in place — nothing is
downloaded, and a missing file fails at once naming its config key):
  python -m sd3_jax.main --config=experiments/vsdv1.py --workdir=DIR \
      --config.data.vsd_root=/path/to/vsd [--config.eval.inception_weights=pt_inception.pth]

`data.vsd_root` holds `VSDv1/{train,val,test}.json` and the images under `images/vg/`,
`images/spatialsense/` (see docs/vsd_format.md). VSD has no gold 3DSG: the graph-supervised
terms train on the annotated stand-in (`data/vsd.py::annotated_3dsg`). By default stage 0
trains the VQ-VAE, encoders and tokenizer on VSD. The paper's pretrained parts, converted
once by `python -m sd3_jax.pretrained convert --kind {vqgan,clip,gpt2} --src ... --out DIR`:
  --config.model.vqvae.pretrained=VQGAN_DIR   VQ-Diffusion's VQGAN (2,887 codes with its
                                              remapping), frozen; stage 0a is skipped
  --config.model.clip.pretrained=CLIP_DIR --config.data.tokenizer=CLIP_DIR
                                              frozen CLIP as c^Y / c^I
  --config.model.text_decoder.pretrained=GPT2_DIR --config.data.tokenizer=GPT2_DIR
                                              GPT-2 as G_T and the text marginal (fine-tuned)
CLIP and GPT-2 each need the text chain to use their tokenizer, so one run takes one of them.

Arguments: `tiny` (the test size, on tests/testdata/vsd), `variant=...` as in
spatial_scenes.py. Shares every key with spatial_scenes.py; this file changes sizes only.
"""
import pathlib

import ml_collections

from sd3_jax import config_lib

def get_config(arg=None):
  parsed = config_lib.parse_arg(arg, tiny=False, variant="sd3")
  base_arg = f"variant={parsed.variant}" + (",tiny" if parsed.tiny else "")
  config = config_lib.load_config(pathlib.Path(__file__).parent / "spatial_scenes.py",
                                  base_arg)
  data = config.data
  data.name = "vsd_v1"  # vsdv2.py: vsd_v2
  data.vsd_root = ml_collections.config_dict.placeholder(str)  # required
  data.tokenizer = ml_collections.config_dict.placeholder(str)  # default: trained on VSD
  for key in ("num_train", "num_val", "num_test", "scene_seed", "caption_style"):
    del data[key]  # spatial-scenes generator settings
  data.graph_overflow = "truncate"  # real annotations: cut and count, never fail the run
  # No unique colours to key slots on (README, "Differences from the paper"): node order.
  data.graph_layout = "sequential"
  for chain in ("image_denoiser", "text_denoiser"):  # slot roles exist on the anchored grid
    config.model[chain].graph_context = False
  if parsed.tiny:
    data.max_nodes, data.max_edges = 24, 32
    return config

  data.image_size = 256
  data.batch_size = 256
  data.max_text_len = 32  # VSD captions are <= 28 words (paper.md §1.2)
  data.text_vocab_size = 8192
  data.max_nodes, data.max_edges = 32, 48
  data.num_workers = 8
  model = config.model
  # f=8 at 256x256: 32x32 image tokens, as VQ-Diffusion.
  model.vqvae.update(codebook_size=4096, embed_dim=256, base_channels=128,
                     channel_mults=(1, 1, 2, 4), num_res_blocks=2)
  model.clip.update(width=512, num_layers=12, num_heads=8, patch_size=16, embed_dim=512)
  model.dgae.update(width=256, encoder_layers=8, decoder_layers=4, num_heads=8,
                    pair_width=128, levels=(8, 8, 8, 5, 5, 5))
  model.image_denoiser.update(width=1024, num_layers=19, num_heads=16)
  # Same width as the image chain: both feed the graph denoiser's teacher slot.
  model.text_denoiser.update(width=1024, num_layers=12, num_heads=16)
  model.graph_denoiser.update(width=256, num_layers=8, num_heads=8, attention_impl="segment")
  model.text_decoder.update(width=768, num_layers=12, num_heads=12)
  model.prior.update(width=512, num_layers=6, num_heads=8)
  model.teacher_tokens = 64
  model.compute_dtype = "bfloat16"  # accelerators' matrix units; params/optimizer float32
  # paper.md §4: AdamW b2 0.98; steps 2-3 lr 1e-4; the dual step 5e-5 after 10k warmup.
  config.stage0a.update(num_steps=200_000, lr=2e-4, warmup_steps=5_000)
  config.stage0b.update(num_steps=100_000, lr=3e-4, warmup_steps=5_000)
  config.stage1.update(num_steps=50_000, lr=3e-4, warmup_steps=2_000)
  config.stage2.update(num_steps=50_000, lr=1e-4, warmup_steps=2_000)
  config.stage3.update(num_steps=100_000, lr=1e-4, warmup_steps=5_000)
  config.stage4.update(num_steps=200_000, lr=5e-5, warmup_steps=10_000, weight_decay=1e-2)
  config.train.update(log_every_steps=100, checkpoint_every_steps=2_000, sample_every_steps=10_000)
  for stage in ("0a", "0b", "1", "2", "3", "4"):
    # Accelerators' allocators keep their memory between calls: one step per call.
    config[f"stage{stage}"].substeps = 1
  config.eval.update(num_samples=5_000, sampling_steps=100, batch_size=256)
  config.mesh = [("data", -1), ("fsdp", 1), ("tensor", 1)]
  return config
