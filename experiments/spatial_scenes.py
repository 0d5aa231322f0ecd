r"""The default experiment: SD³ on the embedded, procedurally generated spatial-scenes benchmark.

COMMAND:
  python -m sd3_jax.main --config=experiments/spatial_scenes.py --workdir=/tmp/sd3_scenes

Arguments (after the colon, comma-separated): `tiny` (the test size), `learn` (the
learning test's tier: 2 objects, small networks, ~7 minutes; tests/learning_test.py), `full`,
`variant=singleton|singleton_3d|vanilla_dual|sd3`. Every value below can be overridden with
`--config.<key>=<value>`; ablations are `--config.variant=...`, stage selection
`--config.stages=0,1,2,3,4`.
"""
import ml_collections

from sd3_jax import config_lib


def _stage(num_steps, lr, warmup_steps=50, weight_decay=1e-4, substeps=1):
  return ml_collections.ConfigDict(dict(num_steps=num_steps, lr=lr, warmup_steps=warmup_steps,
                                        weight_decay=weight_decay, substeps=substeps))


def get_config(arg=None):
  arg = config_lib.parse_arg(arg, tiny=False, learn=False, full=False, variant="sd3")
  config = ml_collections.ConfigDict()
  config.seed = 0
  config.mode = "train"  # train | eval | sample
  config.variant = arg.variant  # singleton | singleton_3d | vanilla_dual | sd3
  # Stage 0: VQ-VAE (0a), then encoders + tokenizer-side priors (0b); 1: DGAE; 2: G_V and
  # G_T alignment; 3: 2DSG -> 3DSG graph diffusion; 4: the dual step.
  config.stages = "0,1,2,3,4"
  # Where weights come from when this workdir has no checkpoint of a stage: `resume`, another
  # run's workdir, continues its stages exactly (optimizer + data state); `init_from`, a
  # workdir or one stage's checkpoint directory, gives starting weights only.
  config.resume = ml_collections.config_dict.placeholder(str)
  config.init_from = ml_collections.config_dict.placeholder(str)

  # The data stage: generate scenes -> graph vocab + tokenizer -> array_record -> batches.
  config.data = data = ml_collections.ConfigDict()
  data.name = "spatial_scenes"
  data.dir = ml_collections.config_dict.placeholder(str)  # default: <workdir>/data
  # The default tier: 32x32 images, 2-4 objects (all eight relations, occlusion and
  # stacking stay); `:full` is the 64x64, 2-5 object tier.
  data.num_train = 10_000
  data.num_val = 300
  data.num_test = 300
  data.scene_seed = 1234
  data.image_size = 32
  # Difficulty tier: objects per scene (each needs its own colour, at most 7).
  data.min_objects = 2
  data.max_objects = 4
  data.caption_style = "v1"  # v1 (templated) | v2 (varied, longer) | both
  data.batch_size = 32  # global batch
  data.max_text_len = 48  # covers every templated caption (p99 42 tokens), v2 p99 45
  data.text_vocab_size = 256
  # Graph slots (data/scenes.py, "slot layout"). 'anchored': max_objects object slots, each
  # with its attribute slots and per object pair three relation slots; the 3DSG target is
  # laid out on its condition's slots (the VSG's / TSG's objects first, in their order,
  # then the ones they lack), so the chain copies slot by slot and completes the tail.
  # 'palette' fixes one slot per palette colour (92 slots; a graph train step costs 2.95x
  # the 35-slot one, measured side by side);
  # 'sequential' fills slots in node order.
  data.graph_layout = "anchored"
  # = scenes.anchored_slot_count(max_objects): 4 + 12 + 18 + 1; 4 objects: <= 52 edges.
  data.max_nodes = 35
  # Layout cells: each 3DSG object gets a coarse 3D position attribute (its 1x1 ground
  # cell, scenes.layout_cell), on a fourth attribute slot per object (max_nodes then
  # anchored_slot_count(max_objects, cells=True): 39 at 4 objects). The graph chain then
  # lays out the TSG's objects and the image chain draws a layout.
  data.layout_cells = False
  data.max_edges = 64
  data.graph_overflow = "error"  # error | truncate (truncations are counted and reported)
  data.num_workers = 0  # grain worker processes; 0 = in-process
  data.check_batches = 20  # batches the data stage reads back to report throughput

  # One discrete-diffusion setting for the three chains: the dual terms pair them at the
  # same t, so they share T.
  config.diffusion = diff = ml_collections.ConfigDict()
  # Absorbing: a committed token is never redrawn (with mask-and-replace the sampler redraws
  # committed tokens while the model cannot yet copy; README "Recipe").
  diff.kind = "absorbing"  # mask_and_replace | absorbing | uniform
  diff.schedule = "alpha1"  # alpha1 (VQ-Diffusion as released) | linear | cosine
  diff.num_steps = 100
  # Chain loss = vlb_weight * L_t + aux_weight * w(t) * CE(x0), both per token over p(t).
  # VQ-Diffusion: 1 and 5e-4. 0 and 1 (adaptive_aux False) is the plain x0 cross-entropy
  # of MaskGIT / DDCap, which weights the high-mask steps (where layout is decided) as
  # much as the low-mask ones that the VLB weights most; like the aux term it is divided by
  # p(t), so it reads T x the mean CE. Measured no better here (README, "What the default
  # job reaches").
  diff.vlb_weight = 1.0
  diff.aux_weight = 5e-4  # VQ-Diffusion's auxiliary x0 cross-entropy weight λ
  diff.adaptive_aux = True  # w(t) = 2 - t/T
  # Stage 4: the image chain's loss weight of tokens on objects (1: plain; the background
  # is most of the grid and needs no condition). 5 vs 1, stage 4 from one stage 3: ST2I
  # 0.259 vs 0.167, object recall 0.87 vs 0.70 (README, "What was measured on the way").
  diff.image_object_weight = 5.0
  diff.cond_drop_rate = 0.1  # condition dropout: trains the null condition for guidance
  diff.graph_drop_rate = 0.1  # stage 4: drops c^G alone, so the chains stay text/image-led

  config.model = model = ml_collections.ConfigDict()
  # f=4 (8x8 tokens at 32x32) with 256 codes: at f=8 / 1024 codes the token marginal was
  # near uniform (6.4 nats), a needlessly hard target for the image chain.
  # object_weight: the loss weight of object pixels (a few % of a render) vs background.
  model.vqvae = ml_collections.ConfigDict(dict(
      codebook_size=256, embed_dim=32, base_channels=16, channel_mults=(1, 2),
      num_res_blocks=1, quantizer="ema", fsq_levels=(8, 5, 5, 5), commitment=0.25,
      ema_decay=0.99, dead_code_steps=50, object_weight=20.0, l1_weight=1.0))
  model.clip = ml_collections.ConfigDict(dict(width=128, num_layers=2, num_heads=4,
                                              patch_size=8, embed_dim=128))
  # Pretrained parts (directories written by `python -m sd3_jax.pretrained convert`): the
  # VQGAN replaces the VQ-VAE (stage 0a is skipped), a CLIP the stage-0b encoders (frozen;
  # data.tokenizer must then be the same CLIP directory), GPT-2 G_T and the text prior
  # (fine-tuned; data.tokenizer must be GPT-2's). None: trained in the project.
  model.vqvae.pretrained = ml_collections.config_dict.placeholder(str)
  model.clip.pretrained = ml_collections.config_dict.placeholder(str)
  # slot_positions: the decoder knows each node's slot. encoder_layers=0: under the slot-grid
  # layout the slots carry the structure, so each node's code is its own content and a
  # visible object has the same code in the VSG as in the 3DSG (copying is the identity).
  model.dgae = ml_collections.ConfigDict(dict(width=64, encoder_layers=0, decoder_layers=2,
                                              num_heads=4, pair_width=64,
                                              levels=(8, 5, 5, 5), edge_weight=5.0,
                                              slot_positions=True))
  # c^G as the consumers see it: 'embed' (FSQ vector + one-hot code id, i.e. a learned code
  # embedding) or 'fsq' (the 4-number FSQ vector alone).
  model.graph_interface = "embed"
  # The chains' compute dtype: float32 | bfloat16 (parameters and optimizer stay float32).
  model.compute_dtype = "float32"
  # graph_context: the chain's graph tokens add their slot's context on the anchored grid
  # (an object its attributes, a relation its two objects with theirs), so one token states
  # a whole fact. Needs data.graph_layout=anchored. Stage 4 from one stage 3 (README, "What
  # was measured on the way"): SI2T 0.256 -> 0.375 with it in both chains, ST2I 0.259 -> 0.167.
  # layout_canvas: each 3DSG object paints its features onto the token grid where a learned
  # placement (from its attributes; data.layout_cells makes it a layout) puts it.
  model.image_denoiser = ml_collections.ConfigDict(dict(width=128, num_layers=3, num_heads=4,
                                                        graph_context=False,
                                                        layout_canvas=False))
  model.text_denoiser = ml_collections.ConfigDict(dict(width=128, num_layers=3, num_heads=4,
                                                       graph_context=True))
  # attention_impl: 'segment' (jraph segment_softmax over the slot graph) or 'dense' (same
  # parameters and outputs, tested equal); dense is ~3x faster on CPU.
  # aligned_slots: slot identity shared by the 3DSG and the 2DSG condition (see
  # models/graph_denoiser.py); False is the permutation-equivariant set model.
  # box_geometry: the chain reads the VSG's object boxes (an object slot its own, a relation
  # slot its pair's), so the 3D relations a 2D relation hides are predictable from the view.
  model.graph_denoiser = ml_collections.ConfigDict(dict(width=128, num_layers=3, num_heads=4,
                                                        attention_impl="dense",
                                                        aligned_slots=True,
                                                        box_geometry=True))
  model.text_decoder = ml_collections.ConfigDict(dict(width=128, num_layers=2, num_heads=4))
  model.text_decoder.pretrained = ml_collections.config_dict.placeholder(str)
  model.prior = ml_collections.ConfigDict(dict(width=128, num_layers=2, num_heads=4))
  model.teacher_tokens = 16  # the image chain's hidden grid is pooled to this many tokens

  # Shared optimizer settings; per-stage step counts and learning rates below.
  # grad_accum_steps: each batch as k micro-batches, one update (steps.accumulated_grads).
  config.optim = ml_collections.ConfigDict(dict(b1=0.9, b2=0.98, grad_clip=1.0,
                                                end_lr_factor=0.1, ema_decay=0.99,
                                                grad_accum_steps=1))
  # The whole default job takes ~30 minutes on 2 CPU cores, stage 4 (the dual step) ~14 of
  # them (README: what each stage costs and reaches); scale up on accelerators.
  # Each stage also pays ~30-40 s of compilation and held-out evaluation on 2 CPU cores.
  # `substeps`: train steps per compiled call (a lax.scan, same results; calls also end at
  # log/checkpoint/sample steps). Each XLA:CPU call maps and zeroes a fresh temp arena
  # (780 MiB for the dual step), so 5 per call make stages 0b, 1, 3 and 4 15-40% faster;
  # stages that train convolutions keep 1 (XLA:CPU's conv weight gradients in a loop are
  # ~25x slower; CLIP's patch embedding is a matmul for this reason).
  config.stage0a = _stage(800, 2e-3)  # VQ-VAE
  config.stage0b = _stage(800, 1e-3, substeps=5)  # contrastive encoders + priors p̂(y), p̂(i)
  config.stage1 = _stage(300, 2e-3, substeps=5)  # DGAE (held-out 1.000 / 1.000 from 300 on)
  # The DGAE quality gate: held-out floors checked before the graph diffusion trains on its
  # codes (the run stops with a message below them).
  config.stage1.min_tag_acc = 0.98
  config.stage1.min_edge_f1 = 0.95
  config.stage2 = _stage(300, 1e-3)  # G_V adapter + G_T
  config.stage3 = _stage(1200, 1e-3, substeps=5)  # graph diffusion
  config.stage4 = _stage(1200, 1e-3, warmup_steps=100, weight_decay=1e-2, substeps=5)  # dual
  # The condition encoders (c^Y, c^I) keep learning in stage 4, from the chains' losses.
  config.stage4.train_encoders = True

  # Stage-4 loss weights (the variant switches terms off, see sd3_jax/steps.py).
  config.loss = loss = ml_collections.ConfigDict()
  loss.image = 1.0
  loss.text = 1.0
  loss.graph = 1.0  # L_I23D + L_T23D
  loss.kl = 1.0  # L_X-I23D + L_X-T23D (student -> teacher, eq. 2-3)
  loss.teacher = 1.0  # the teacher branches' own graph loss
  # The teacher branches and their KL see every k-th example of the batch (1: all). 4 makes
  # the SD³ step 19% cheaper (49.8 vs 61.5 GFLOP); stage 4 alone at 4 vs 1 moved no figure
  # beyond its paired-bootstrap interval (README, "Differences from the paper").
  loss.teacher_stride = 4
  loss.dual = 0.01  # λ_dual on |log p̂(i) + log p(y|i) - log p̂(y) - log p(i|y)| (eq. 9)
  loss.length = 0.1  # the text denoiser's length head
  # Share of stage-4 examples whose 3D->X chains get the graph chain's own x0 prediction
  # instead of the gold 3DSG (what they get at inference: no exposure bias to the gold).
  loss.predicted_graph_rate = 0.5

  config.train = ml_collections.ConfigDict(dict(
      log_every_steps=25, checkpoint_every_steps=100, keep_checkpoints=2,
      # Stage-4 sample sheets (ST2I, SI2T, 3DSG drawings) every N steps; 0: only the final
      # evaluation's grids (each sheet costs a sampler compile + run).
      sample_every_steps=0,
      # Held-out curve points on `curve_examples` val examples every N steps, drawn in
      # curves.png: 3DSG F1 from the VSG / TSG with the copy baselines in stages 3 and 4,
      # ST2I / SI2T spatial accuracy with their chance baselines in stage 4; 0: none.
      eval_every_steps=600, curve_examples=64))

  config.eval = ml_collections.ConfigDict(dict(
      num_samples=128, sampling_steps=25, truncation_r=0.86, guidance_scale=2.0,
      batch_size=64, split="test",
      # ancestral | confidence per chain (generate._sample).
      image_sampler="ancestral", text_sampler="confidence", graph_sampler="confidence",
      # What the 3D->X chains are conditioned on: the 3DSG the graph chain generates, or
      # (an oracle, to measure how much the graph chain costs) the gold one.
      graph_condition="generated"))
  # Local files for the paper's metrics (nothing is downloaded); unset -> that table cell is
  # blank with the reason. FID/IS: the FID InceptionV3 .pth; CLIP score: a HF CLIP directory;
  # METEOR / SPICE: directories with their jars (Java needed).
  str_or_none = ml_collections.config_dict.placeholder(str)
  config.eval.inception_weights = str_or_none
  config.eval.clip_dir = str_or_none
  config.eval.meteor_dir = str_or_none
  config.eval.spice_dir = str_or_none
  config.eval.java_scorers = True  # METEOR/SPICE start a JVM (~20 s); False: blank cells
  config.eval.is_splits = 10  # Inception Score splits
  # Finished workdirs (comma-separated) whose rows join this run's `table.md`, e.g. the other
  # variants: `--config.mode=eval --config.eval.compare_with=/runs/singleton,/runs/sd3`.
  config.eval.compare_with = str_or_none

  config.mesh = [("data", -1), ("fsdp", 1), ("tensor", 1)]
  # Logical axis -> mesh axes. Activations shard on the batch; weights along fsdp/tensor.
  config.logical_axis_rules = [
      ("batch", ("data", "fsdp")),
      ("length", None),
      ("cond_length", None),
      ("embed", "fsdp"),
      ("cond_embed", None),
      ("mlp", "tensor"),
      ("heads", "tensor"),
      ("kv", None),
      ("vocab", "tensor"),
      ("conv_h", None),
      ("conv_w", None),
      ("conv_in", None),
      ("conv_out", None),  # RGB outputs (3 channels) do not split over tensor
  ]

  if arg.full:
    # The full tier: 64x64, 2-5 objects, f=4 (16x16 tokens), longer stages (hours on CPU).
    data.update(image_size=64, min_objects=2, max_objects=5, max_nodes=51, max_edges=80,
                num_train=40_000, num_val=500, num_test=500)
    model.vqvae.update(codebook_size=512)
    for name, steps in (("stage0a", 3000), ("stage0b", 3000), ("stage1", 2000),
                        ("stage2", 1000), ("stage3", 10_000), ("stage4", 20_000)):
      config[name].num_steps = steps
    config.train.eval_every_steps = 2000
  if arg.learn:
    # The smallest run in which the chains must learn (tests/learning_test.py): two
    # objects a scene, narrow networks, a few hundred steps a stage (~7 min on 2 cores).
    data.update(min_objects=2, max_objects=2, max_nodes=12, max_edges=16,  # 2 + 6 + 3 + 1 slots
                num_train=2000, num_val=64, num_test=128, max_text_len=32, check_batches=2)
    for name in ("image_denoiser", "text_denoiser", "graph_denoiser"):
      model[name].update(width=64, num_layers=2, num_heads=4)
    model.clip.update(width=64, num_layers=1, num_heads=4, embed_dim=64)
    for name, steps in (("stage0a", 300), ("stage0b", 150), ("stage1", 300),
                        ("stage2", 50), ("stage3", 300), ("stage4", 800)):
      config[name].update(num_steps=steps, warmup_steps=20)
    config.train.update(log_every_steps=50, checkpoint_every_steps=1000, eval_every_steps=0)
    config.eval.update(num_samples=128, sampling_steps=16, java_scorers=False)
  if arg.tiny:
    data.num_train, data.num_val, data.num_test = 64, 16, 16
    data.image_size = 32
    data.batch_size = 8
    data.max_text_len = 16
    data.text_vocab_size = 96
    data.check_batches = 2
    diff.num_steps = 8
    model.vqvae.update(codebook_size=32, embed_dim=8, base_channels=8, channel_mults=(1, 2, 2))
    model.clip.update(width=16, num_layers=1, num_heads=2, patch_size=8, embed_dim=16)
    model.dgae.update(width=16, encoder_layers=1, decoder_layers=1, num_heads=2, pair_width=8,
                      levels=(3, 3))
    for name in ("image_denoiser", "text_denoiser", "graph_denoiser", "text_decoder", "prior"):
      model[name].update(width=16, num_layers=1, num_heads=2)
    model.graph_denoiser.attention_impl = "segment"  # tests exercise the jraph path
    model.teacher_tokens = 4
    for name in ("stage0a", "stage0b", "stage1", "stage2", "stage3", "stage4"):
      config[name].update(num_steps=3, warmup_steps=1)
    # Three steps train no DGAE: the gate would stop every tiny run.
    config.stage1.update(min_tag_acc=0.0, min_edge_f1=0.0)
    config.train.update(log_every_steps=1, checkpoint_every_steps=2, sample_every_steps=2,
                        eval_every_steps=2, curve_examples=8)
    config.eval.update(num_samples=8, sampling_steps=4, batch_size=8)
  return config
