"""Pretrained parts: conversion from the standard files, parity with the reference
implementations (small random models made here, several configs a kind), tokenizers, and
the clear errors. The parity tests need the `parity` extra (torch) and taming's modules;
they skip without them."""
import json
import pathlib
import subprocess
import sys

import flax
import jax
import numpy as np
import pytest
import safetensors.numpy

from sd3_jax import pretrained
from sd3_jax.benchmarks import parity
from sd3_jax.data.schema import DataError
from sd3_jax.scores import clip_score

ROOT = pathlib.Path(__file__).resolve().parents[1]

def _torch():
  torch = pytest.importorskip("torch", reason="parity extra (torch) not installed")
  pytest.importorskip("transformers")
  return torch


def _hf_dir(tmp_path, kind, config, seed=0):
  _torch()
  return parity.save_hf(kind, config, tmp_path / f"{kind}_hf", seed)


def _taming_ckpt(tmp_path, dd, n_embed, kept, seed=0):
  _torch()
  pytest.importorskip("taming.modules.diffusionmodules.model",
                      reason="taming-transformers not installed")
  return parity.save_taming(dd, n_embed, kept, tmp_path, seed)


def _assert_parity(result):
  assert result["ok"], result
  assert all(v <= 1e-4 for v in result["max_diff"].values()), result


@pytest.mark.parametrize("name", list(parity.CLIP_CONFIGS))
def test_clip_parity(tmp_path, name):
  d = _hf_dir(tmp_path, "clip", parity.CLIP_CONFIGS[name])
  _assert_parity(pretrained.check("clip", d))


@pytest.mark.parametrize("name", list(parity.GPT2_CONFIGS))
def test_gpt2_parity(tmp_path, name):
  result = pretrained.check("gpt2", _hf_dir(tmp_path, "gpt2", parity.GPT2_CONFIGS[name]))
  _assert_parity(result)
  assert set(result["max_diff"]) == {"logits_relative", "hidden", "prefix_logits_relative"}


@pytest.mark.parametrize("name", list(parity.VQGAN_CONFIGS))
def test_vqgan_parity(tmp_path, name):
  ckpt, mapping, _ = _taming_ckpt(tmp_path, *parity.VQGAN_CONFIGS[name])
  result = pretrained.check("vqgan", ckpt, mapping)
  _assert_parity(result)
  assert result["max_diff"]["tokens_mismatch"] == 0.0


def test_vqgan_architecture_read_off_the_checkpoint(tmp_path):
  ckpt, mapping, _ = _taming_ckpt(tmp_path, *parity.VQGAN_CONFIGS["remap"])
  out = pretrained.convert("vqgan", ckpt, tmp_path / "out", mapping)
  pre = pretrained.load(out, "vqgan")
  m = pre.module
  assert (m.ch, tuple(m.ch_mult), m.num_res_blocks, tuple(m.attn_levels)) == (32, (1, 2), 1,
                                                                              (1,))
  assert (m.n_embed, m.num_codes, m.downsample_factor) == (64, 20, 2)
  images = np.random.default_rng(0).uniform(-1, 1, (1, 8, 8, 3)).astype(np.float32)
  tokens = m.apply(pre.variables, images, method=m.encode)
  assert tokens.shape == (1, 4, 4) and int(tokens.max()) < 20
  assert m.apply(pre.variables, tokens, method=m.decode_indices).shape == (1, 8, 8, 3)


def test_torch_free_reader_matches_torch_load(tmp_path):
  torch = _torch()
  ckpt, mapping, net = _taming_ckpt(tmp_path, *parity.VQGAN_CONFIGS["remap"])
  state = pretrained.read_taming_checkpoint(ckpt)
  want = {k: v.numpy() for k, v in net.state_dict().items() if not k.startswith("loss.")}
  assert set(state) == set(want)
  for k, v in want.items():
    np.testing.assert_array_equal(state[k], v)
  np.testing.assert_array_equal(pretrained.read_remapping(mapping, 64),
                                torch.load(str(mapping)).numpy())


def test_check_cli_prints_one_json_line(tmp_path):
  d = _hf_dir(tmp_path, "gpt2", parity.GPT2_CONFIGS["relu_unscaled"])
  proc = subprocess.run([sys.executable, "-m", "sd3_jax.pretrained", "check", "--kind=gpt2",
                         f"--src={d}"], cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-2000:]
  lines = proc.stdout.strip().splitlines()
  assert len(lines) == 1
  assert json.loads(lines[0])["ok"] is True
  # An impossible tolerance fails the check.
  proc = subprocess.run([sys.executable, "-m", "sd3_jax.pretrained", "check", "--kind=gpt2",
                         f"--src={d}", "--tolerance=0"], cwd=ROOT, capture_output=True,
                        text=True, timeout=300)
  assert proc.returncode == 1 and json.loads(proc.stdout)["ok"] is False


# --- Tokenizers (no torch) --------------------------------------------------------------------


def _byte_chars():
  """GPT-2's reversible byte -> printable character table."""
  bs = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1)))
  cs, n = bs[:], 0
  for b in range(256):
    if b not in bs:
      bs.append(b)
      cs.append(256 + n)
      n += 1
  return [chr(c) for c in cs]


def _write_bpe(d, vocab_tokens, merges):
  d.mkdir(parents=True, exist_ok=True)
  (d / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab_tokens)}))
  (d / "merges.txt").write_text("".join(f"{m}\n" for m in ["#version: 0.2", *merges]))
  return d


@pytest.mark.parametrize("kind", ["clip", "gpt2"])
def test_tokenizer_round_trip(tmp_path, kind):
  chars = _byte_chars()
  if kind == "clip":
    merges = ["r e", "re d</w>", "c u", "cu b"]
    tokens = chars + [c + "</w>" for c in chars] + ["re", "red</w>", "cu", "cub",
                                                   "<|startoftext|>", "<|endoftext|>"]
  else:
    merges = ["r e", "re d", "Ġ red"]
    tokens = chars + ["re", "red", "Ġred", "<|endoftext|>"]
  d = _write_bpe(tmp_path / "tok", tokens, merges)
  tok = pretrained.load_tokenizer(d, kind)
  text = "a red cube is left of the red sphere"
  ids = tok(text)["input_ids"]
  assert tok.decode(ids, skip_special_tokens=True).strip() == text
  merged = "red</w>" if kind == "clip" else "Ġred"
  assert tokens.index(merged) in ids  # the merges were applied


def test_tokenizer_files_travel_with_the_conversion(tmp_path):
  d = _hf_dir(tmp_path, "gpt2", parity.GPT2_CONFIGS["base"])
  _write_bpe(d, _byte_chars() + ["<|endoftext|>"], [])
  out = pretrained.convert("gpt2", d, tmp_path / "out")
  pre = pretrained.load(out)
  assert pre.tokenizer().decode(pre.tokenizer()("left of")["input_ids"]) == "left of"


# --- CLIP preprocessing (no torch) ------------------------------------------------------------


@pytest.mark.parametrize("shape,size", [((64, 64), 224), ((100, 150), 224), ((150, 97), 32),
                                        ((31, 40), 16)])
def test_clip_preprocess_equals_the_reference_processor(shape, size):
  transformers = pytest.importorskip("transformers")
  images = np.random.default_rng(0).integers(0, 256, (2, *shape, 3), dtype=np.uint8)
  proc = transformers.CLIPImageProcessorPil(size={"shortest_edge": size},
                                            crop_size={"height": size, "width": size})
  want = proc(list(images), return_tensors="np")["pixel_values"].transpose(0, 2, 3, 1)
  got = clip_score.clip_preprocess(images, size)
  assert got.shape == want.shape
  np.testing.assert_allclose(got, want, atol=1e-5)


# --- Clear errors -------------------------------------------------------------------------------


def test_missing_files_name_the_file(tmp_path):
  with pytest.raises(DataError, match="not a directory"):
    pretrained.check("clip", tmp_path / "nope")
  (tmp_path / "empty").mkdir()
  with pytest.raises(DataError, match="model.safetensors"):
    pretrained.convert("gpt2", tmp_path / "empty", tmp_path / "out")
  with pytest.raises(DataError, match="file not found"):
    pretrained.convert("vqgan", tmp_path / "last.ckpt", tmp_path / "out")
  with pytest.raises(DataError, match="pretrained.json"):
    pretrained.load(tmp_path / "empty")


def test_mismatched_tensor_names_tensor_and_expected_shape(tmp_path):
  d = tmp_path / "gpt2"
  d.mkdir()
  cfg = parity.GPT2_CONFIGS["relu_unscaled"]
  (d / "config.json").write_text(json.dumps(cfg))
  module = pretrained.gpt2_model_from_config(cfg)
  shapes = jax.eval_shape(lambda: module.init(jax.random.PRNGKey(0), np.zeros((1, 4), int)))
  state = {}
  for path, leaf in flax.traverse_util.flatten_dict(shapes["params"]).items():
    name = ".".join(p.replace("h_", "h.") for p in path[:-1])
    leaf_name = {"kernel": "weight", "scale": "weight", "embedding": "weight"}.get(path[-1],
                                                                                  path[-1])
    state[f"transformer.{name}.{leaf_name}"] = np.zeros(leaf.shape, np.float32)
  state["transformer.wpe.weight"] = np.zeros((7, 16), np.float32)
  safetensors.numpy.save_file(state, str(d / "model.safetensors"))
  with pytest.raises(DataError, match=r"transformer\.wpe\.weight.*\(7, 16\).*\(20, 16\)"):
    pretrained.convert("gpt2", d, tmp_path / "out")
  del state["transformer.wpe.weight"]
  safetensors.numpy.save_file(state, str(d / "model.safetensors"))
  with pytest.raises(DataError, match=r"missing \['params.wpe.embedding'\]"):
    pretrained.convert("gpt2", d, tmp_path / "out")


def test_taming_checkpoint_errors(tmp_path):
  ckpt, _, _ = _taming_ckpt(tmp_path, *parity.VQGAN_CONFIGS["remap"])
  state = pretrained.read_taming_checkpoint(ckpt)
  del state["quant_conv.weight"]
  with pytest.raises(DataError, match="field 'quant_conv.weight'"):
    pretrained.vqgan_config_from_state(state, str(ckpt))
  bad = tmp_path / "bad_remap.npy"
  np.save(bad, np.zeros(10, np.int64))
  with pytest.raises(DataError, match="64 codes"):
    pretrained.convert("vqgan", ckpt, tmp_path / "out", bad)
  with pytest.raises(DataError, match="kind vqgan"):
    pretrained.convert("clip", ckpt, tmp_path / "out", bad)


def test_load_checks_the_kind(tmp_path):
  d = _hf_dir(tmp_path, "gpt2", parity.GPT2_CONFIGS["relu_unscaled"])
  out = pretrained.convert("gpt2", d, tmp_path / "out")
  with pytest.raises(DataError, match="holds a 'gpt2' model, not 'clip'"):
    pretrained.load(out, "clip")


def test_cli_user_error_is_one_line(tmp_path):
  proc = subprocess.run([sys.executable, "-m", "sd3_jax.pretrained", "convert", "--kind=clip",
                         f"--src={tmp_path}/nope", f"--out={tmp_path}/out"], cwd=ROOT,
                        capture_output=True, text=True, timeout=120)
  assert proc.returncode == 2
  assert proc.stderr.strip().splitlines()[-1].startswith("error: ")
  assert "Traceback" not in proc.stderr


# --- The VSD config with the pretrained parts ---------------------------------------------------


def test_vsd_trains_with_pretrained_vqgan_and_clip(tmp_path):
  """model.vqvae.pretrained and model.clip.pretrained end to end: stage 0a is skipped, the
  VQGAN tokenizes (its 40 kept codes are the image vocabulary), the CLIP reads the text
  chain's ids (data.tokenizer is the CLIP directory), and both stay frozen in every stage."""
  torch = _torch()
  import orbax.checkpoint as ocp  # pylint: disable=import-outside-toplevel
  import transformers  # pylint: disable=import-outside-toplevel
  chars = _byte_chars()
  hf = _write_bpe(tmp_path / "clip_hf", chars + [c + "</w>" for c in chars]
                  + ["<|startoftext|>", "<|endoftext|>"], [])
  vocab = len(pretrained.load_tokenizer(hf, "clip"))
  torch.manual_seed(0)
  transformers.CLIPModel(transformers.CLIPConfig(
      text_config=dict(vocab_size=vocab, hidden_size=16, intermediate_size=32,
                       num_hidden_layers=1, num_attention_heads=2, max_position_embeddings=32,
                       bos_token_id=vocab - 2, eos_token_id=vocab - 1, pad_token_id=vocab - 1),
      vision_config=dict(hidden_size=24, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, image_size=16, patch_size=8),
      projection_dim=8)).save_pretrained(str(hf))
  clip_dir = pretrained.convert("clip", hf, tmp_path / "clip")
  dd = dict(ch=32, ch_mult=(1, 2, 2), num_res_blocks=1, attn_resolutions=[8], resolution=32,
            z_channels=8)  # f = 4: 8x8 tokens on the tiny config's 32x32 images
  ckpt, mapping, _ = _taming_ckpt(tmp_path, dd, 64, 40)
  vq_dir = pretrained.convert("vqgan", ckpt, tmp_path / "vqgan", mapping)
  work = tmp_path / "run"
  run = subprocess.run(
      [sys.executable, "-m", "sd3_jax.main", "--config=experiments/vsdv1.py:tiny",
       f"--workdir={work}", f"--config.data.vsd_root={ROOT / 'tests' / 'testdata' / 'vsd'}",
       f"--config.data.tokenizer={clip_dir}", f"--config.model.vqvae.pretrained={vq_dir}",
       f"--config.model.clip.pretrained={clip_dir}", "--config.stages=0,2,4"],
      cwd=ROOT, capture_output=True, text=True, timeout=900)
  assert run.returncode == 0, run.stderr[-3000:]
  assert "stages 0b, 2, 4" in run.stdout and "[stage0a]" not in run.stdout
  assert "vqvae: pretrained, frozen" in run.stdout and "clip: pretrained, frozen" in run.stdout
  assert "image_prior_nll" in run.stdout
  saved = ocp.PyTreeCheckpointer().restore(str(work / "checkpoints" / "stage4" / "3" / "state"))
  for net, d in (("vqvae", vq_dir), ("clip", clip_dir)):
    want = jax.tree.leaves(pretrained.load(d).variables["params"])
    for key in ("params", "ema_params"):
      got = jax.tree.leaves(saved[key][net])
      assert len(got) == len(want)
      for a, b in zip(got, want):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  np.testing.assert_array_equal(saved["model_state"]["remap"]["full_to_quantize"],
                                torch.load(str(mapping)).numpy())


def test_pretrained_clip_needs_the_clip_tokenizer(tmp_path):
  """A CLIP over another vocabulary than the text chain's is one clear error."""
  from sd3_jax import config_lib  # pylint: disable=import-outside-toplevel
  from sd3_jax.models import sd3 as sd3_lib  # pylint: disable=import-outside-toplevel
  d = _hf_dir(tmp_path, "clip", parity.CLIP_CONFIGS["legacy_eos"])
  out = pretrained.convert("clip", d, tmp_path / "c")
  config = config_lib.load_config(ROOT / "experiments" / "vsdv1.py", "tiny")
  config.model.clip.pretrained = str(out)
  with pytest.raises(ValueError, match="set data.tokenizer to the CLIP directory"):
    sd3_lib.SD3(config, text_vocab_size=500, graph_vocab_size=10)
  config.data.max_text_len = 40
  with pytest.raises(ValueError, match="exceeds CLIP's 16 positions"):
    sd3_lib.SD3(config, text_vocab_size=99, graph_vocab_size=10)


def test_missing_pretrained_directory_names_its_key(tmp_path):
  from sd3_jax import config_lib  # pylint: disable=import-outside-toplevel
  from sd3_jax.data import stage  # pylint: disable=import-outside-toplevel
  config = config_lib.load_config(ROOT / "experiments" / "spatial_scenes.py", "tiny")
  config.model.vqvae.pretrained = str(tmp_path / "vqgan")
  (tmp_path / "clip").mkdir()
  config.model.clip.pretrained = str(tmp_path / "clip")
  with pytest.raises(FileNotFoundError) as e:
    stage.check_local_inputs(config)
  assert f"{tmp_path / 'vqgan'} (model.vqvae.pretrained" in str(e.value)
  assert f"{tmp_path / 'clip' / 'pretrained.json'} (model.clip.pretrained" in str(e.value)


def _tiny_gpt2_dir(tmp_path, n_positions=64):
  """A HF GPT-2 directory whose vocabulary is a byte-level BPE tokenizer's beside it."""
  torch = _torch()
  import transformers  # pylint: disable=import-outside-toplevel
  d = _write_bpe(tmp_path / "gpt2_hf", _byte_chars() + ["re", "red", "Ġred", "<|endoftext|>"],
                 ["r e", "re d", "Ġ red"])
  vocab = len(pretrained.load_tokenizer(d, "gpt2"))
  torch.manual_seed(0)
  transformers.GPT2LMHeadModel(transformers.GPT2Config(
      vocab_size=vocab, n_positions=n_positions, n_embd=16, n_layer=2, n_head=2,
      bos_token_id=vocab - 1, eos_token_id=vocab - 1)).save_pretrained(str(d))
  return d


def test_prefix_gpt2_marginal_is_gpt2s_likelihood(tmp_path):
  """p̂(y) through `PrefixGPT2` equals the reference GPT2LMHeadModel's log-likelihood of
  the caption after <|endoftext|>, padding ignored; a prefix changes G_T's logits."""
  torch = _torch()
  import transformers  # pylint: disable=import-outside-toplevel
  from sd3_jax.models import gpt2 as gpt2_lib  # pylint: disable=import-outside-toplevel
  d = _tiny_gpt2_dir(tmp_path)
  pre = pretrained.load(pretrained.convert("gpt2", d, tmp_path / "out"))
  lm = gpt2_lib.PrefixGPT2(pre.module.cfg)
  params = {"gpt2": pre.variables["params"]}
  rng = np.random.default_rng(0)
  tokens = rng.integers(0, pre.module.cfg["vocab_size"] - 1, (2, 7))
  mask = np.ones((2, 7), bool)
  mask[1, 4:] = False
  got = np.asarray(lm.log_likelihood(params, tokens, mask))
  ref = transformers.GPT2LMHeadModel.from_pretrained(str(d)).eval()
  bos = pre.module.cfg["bos_token_id"]
  with torch.no_grad():
    for i in range(2):
      seq = [bos] + [int(t) for t in tokens[i][mask[i]]]
      logp = torch.log_softmax(ref(torch.tensor([seq])).logits[0], -1)
      want = sum(float(logp[j, seq[j + 1]]) for j in range(len(seq) - 1))
      assert got[i] == pytest.approx(want, abs=1e-4)
  g_t = gpt2_lib.PrefixGPT2(pre.module.cfg, prefix_dim=5)
  prefix = rng.normal(size=(2, 3, 5)).astype(np.float32)
  v = g_t.init(jax.random.key(0), tokens, mask, prefix)
  v = {"params": dict(v["params"], gpt2=pre.variables["params"])}
  with_prefix = g_t.apply(v, tokens, mask, prefix)
  assert with_prefix.shape == (2, 7, pre.module.cfg["vocab_size"])
  assert not np.allclose(with_prefix, g_t.apply(v, tokens, mask, prefix * 0 + 1))


def test_vsd_trains_with_pretrained_gpt2(tmp_path):
  """model.text_decoder.pretrained: GPT-2 becomes G_T and p̂(y), both fine-tuned from the
  converted weights, with GPT-2's tokenizer as the text chain's (data.tokenizer)."""
  import orbax.checkpoint as ocp  # pylint: disable=import-outside-toplevel
  d = _tiny_gpt2_dir(tmp_path)
  out = pretrained.convert("gpt2", d, tmp_path / "gpt2")
  work = tmp_path / "run"
  run = subprocess.run(
      [sys.executable, "-m", "sd3_jax.main", "--config=experiments/vsdv1.py:tiny",
       f"--workdir={work}", f"--config.data.vsd_root={ROOT / 'tests' / 'testdata' / 'vsd'}",
       f"--config.data.tokenizer={out}", f"--config.model.text_decoder.pretrained={out}",
       "--config.stages=0b,2"], cwd=ROOT, capture_output=True, text=True, timeout=900)
  assert run.returncode == 0, run.stderr[-3000:]
  assert "text_decoder: pretrained, G_T and text prior, fine-tuned" in run.stdout
  assert "[stage2]" in run.stdout and "t_dec=" in run.stdout
  loaded = pretrained.load(out).variables["params"]
  for stage, net in (("stage0b", "text_prior"), ("stage2", "g_t")):
    ckpt = work / "checkpoints" / stage
    step = max(int(p.name) for p in ckpt.iterdir() if p.name.isdigit())
    saved = ocp.PyTreeCheckpointer().restore(str(ckpt / str(step) / "state"))["params"][net]
    assert set(saved) >= {"gpt2"}
    wte = np.asarray(saved["gpt2"]["wte"]["embedding"])
    assert wte.shape == loaded["wte"]["embedding"].shape
    # Fine-tuned from GPT-2: moved, but a few optimizer steps away from the converted weights.
    delta = np.abs(wte - np.asarray(loaded["wte"]["embedding"])).max()
    assert 0 < delta < 0.1
