"""The launchers against stub `gcloud` / `sbatch` on PATH: the calls they make, in order."""
import json
import os
import pathlib
import shutil
import subprocess

REPO = pathlib.Path(__file__).resolve().parent.parent

STUB = """#!/usr/bin/env bash
# Records one JSON line per call: the program and its arguments (and a batch script's text).
python3 - "$(basename "$0")" "$@" <<'PY' >> "$STUB_LOG"
import json, pathlib, sys
name, args = sys.argv[1], sys.argv[2:]
row = {"prog": name, "args": args}
if name == "sbatch":
    row["script"] = pathlib.Path(args[-1]).read_text()
print(json.dumps(row))
PY
case "$*" in
  *" describe "*) echo '{"networkEndpoints": [{}, {}]}' ;;
  *"--command=cat sd3_run.log"*) echo "log of $*" ;;
esac
"""


def _stubs(tmp_path):
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  for prog in ("gcloud", "sbatch"):
    (bin_dir / prog).write_text(STUB)
    (bin_dir / prog).chmod(0o755)
  log = tmp_path / "calls.jsonl"
  env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", STUB_LOG=str(log))
  return env, log


def _calls(log):
  return [json.loads(l) for l in log.read_text().splitlines()] if log.exists() else []


def _run(args, env, cwd):
  return subprocess.run(args, env=env, cwd=cwd, capture_output=True, text=True, timeout=120)


def test_tpu_vm_lifecycle_calls_gcloud_on_every_worker(tmp_path):
  env, log = _stubs(tmp_path)
  tpu = [str(REPO / "launch" / "tpu_vm.sh")]
  where = ["--name=pod", "--zone=us-central2-b"]
  job = ["--", "--config=experiments/vsdv1.py", "--workdir=gs://bucket/run one"]
  for step, extra in (("create", ["--type=v4-32", "--spot"]), ("copy", []), ("setup", []),
                      ("run", job), ("logs", []), ("delete", [])):
    run = _run(tpu + [step] + where + extra, env, tmp_path)
    assert run.returncode == 0, (step, run.stderr)
  calls = [c["args"] for c in _calls(log)]
  assert calls[0][:5] == ["compute", "tpus", "tpu-vm", "create", "pod"]
  assert "--accelerator-type=v4-32" in calls[0] and "--spot" in calls[0]
  scp = next(c for c in calls if c[3] == "scp")
  assert scp[-1] == "--worker=all" and scp[5] == "pod:sd3_jax.tar.gz"
  ssh_all = [c for c in calls if c[3] == "ssh" and "--worker=all" in c]
  commands = [next(a for a in c if a.startswith("--command=")) for c in ssh_all]
  assert "tar -xzf sd3_jax.tar.gz" in commands[0]
  assert "test -d sd3_venv || python3 -m venv sd3_venv" in commands[1]
  assert "sd3_jax[tpu]" in commands[1]
  assert "SD3_JAX_DISTRIBUTED=1 nohup ../sd3_venv/bin/python -m sd3_jax.main" in commands[2]
  assert "--workdir=gs://bucket/run\\ one" in commands[2]  # quoted once, for the remote shell
  # logs: the worker count from `describe`, then one ssh per worker into logs/<name>/.
  per_worker = [c for c in calls if c[3] == "ssh" and "--worker=all" not in c]
  assert [c[-2] for c in per_worker] == ["--worker=0", "--worker=1"]
  assert (tmp_path / "logs" / "pod" / "worker-1.log").read_text().startswith("log of")
  assert calls[-1][:5] == ["compute", "tpus", "tpu-vm", "delete", "pod"]
  assert "--quiet" in calls[-1]


def test_tpu_vm_dry_run_prints_and_calls_nothing(tmp_path):
  env, log = _stubs(tmp_path)
  run = _run([str(REPO / "launch" / "tpu_vm.sh"), "copy", "--name=pod", "--zone=z",
              "--repo=https://example.com/sd3_jax.git", "--dry-run"], env, tmp_path)
  assert run.returncode == 0, run.stderr
  assert "gcloud compute tpus tpu-vm ssh pod --zone=z --worker=all" in run.stdout
  assert "git clone -q --branch main https://example.com/sd3_jax.git sd3_jax" in run.stdout
  assert not _calls(log)
  bad = _run([str(REPO / "launch" / "tpu_vm.sh"), "run", "--name=pod"], env, tmp_path)
  assert bad.returncode == 2 and "--zone=ZONE is required" in bad.stderr


def test_slurm_submits_one_process_per_gpu(tmp_path):
  env, log = _stubs(tmp_path)
  slurm = [str(REPO / "launch" / "slurm_gpu.sh"), "--nodes=2", "--gpus-per-node=4",
           "--partition=gpu", f"--venv={tmp_path / 'venv'}", f"--logs={tmp_path / 'slurm'}"]
  job = ["--", "--config=experiments/vsdv1.py", "--workdir=/shared/run"]
  dry = _run(slurm + ["--dry-run"] + job, env, tmp_path)
  assert dry.returncode == 0 and not _calls(log)
  assert "#SBATCH --nodes=2" in dry.stdout and f"sbatch {tmp_path / 'slurm' / 'sd3_jax.sbatch'}" in dry.stdout
  run = _run(slurm + ["--job-name=t1"] + job, env, tmp_path)
  assert run.returncode == 0, run.stderr
  (call,) = _calls(log)
  assert call["prog"] == "sbatch" and call["args"][-1] == str(tmp_path / "slurm" / "t1.sbatch")
  script = call["script"]
  for line in ("#SBATCH --nodes=2", "#SBATCH --ntasks-per-node=4", "#SBATCH --gpus-per-node=4",
               "#SBATCH --partition=gpu", "#SBATCH --job-name=t1"):
    assert line in script.splitlines()
  assert "pip install -q -e '.[cuda12]'" in script
  assert ("srun --ntasks-per-node=4 --gpus-per-task=1" in script
          and "env SD3_JAX_DISTRIBUTED=1" in script
          and "-m sd3_jax.main --config=experiments/vsdv1.py --workdir=/shared/run" in script)
  # The script is valid bash.
  assert subprocess.run(["bash", "-n", call["args"][-1]]).returncode == 0
  bad = _run(slurm[:1] + ["--nodes=0"] + job, env, tmp_path)
  assert bad.returncode == 2 and "positive integers" in bad.stderr


# A stand-in for `python -m sd3_jax.main` / `-m sd3_jax.report` in launch/ablation.sh: records
# each call; a training call writes a finished workdir (results, and a checkpoint for every
# stage the script did not copy in).
PYTHON_STUB = """#!/usr/bin/env bash
exec python3 - "$@" <<'PY'
import json, os, pathlib, sys
args = sys.argv[1:]
with open(os.environ["STUB_LOG"], "a") as log:
    log.write(json.dumps(args) + "\\n")
if args[:2] == ["-m", "sd3_jax.main"]:
    flags = dict(a[2:].split("=", 1) for a in args[2:])
    wd = pathlib.Path(flags["workdir"])
    variant = flags["config"].split("variant=")[1]
    copied = sorted(p.name for p in (wd / "checkpoints").glob("stage*"))
    for stage in ("0a", "0b", "1", "2", "3", "4"):
        (wd / "checkpoints" / f"stage{stage}").mkdir(parents=True, exist_ok=True)
    cfg = {"variant": variant, "seed": int(flags["config.seed"])}
    for name, value in (("config.json", cfg), ("summary.json", {"copied": copied}),
                        ("eval_examples.json", [])):
        (wd / name).write_text(json.dumps(value))
PY
"""


def _ablation(tmp_path, out, seeds, results):
  bin_dir = tmp_path / "pybin"
  if not bin_dir.exists():
    bin_dir.mkdir()
    (bin_dir / "python").write_text(PYTHON_STUB)
    (bin_dir / "python").chmod(0o755)
  log = tmp_path / "python_calls.jsonl"  # this call's only
  log.unlink(missing_ok=True)
  env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", STUB_LOG=str(log),
             SEEDS=seeds, RESULTS=str(results))
  run = _run(["bash", str(REPO / "launch" / "ablation.sh"), str(tmp_path / out)], env, tmp_path)
  return run, [json.loads(l) for l in log.read_text().splitlines()] if log.exists() else []


def test_ablation_keeps_results_across_calls_and_reports_every_kept_seed(tmp_path):
  results = tmp_path / "kept"
  run, calls = _ablation(tmp_path, "a", "0", results)
  assert run.returncode == 0, run.stderr
  trained = [c[2].split("variant=")[1] for c in calls if c[1] == "sd3_jax.main"]
  assert trained == ["sd3", "singleton", "vanilla_dual", "singleton_3d"]
  # The exact stage sharing: 0a/0b for all, 1-3 for Singleton + 3D, copied from SD³'s run.
  summary = lambda d, run: json.loads((d / run / "summary.json").read_text())["copied"]
  assert summary(tmp_path / "a", "singleton-s0") == ["stage0a", "stage0b"]
  assert summary(tmp_path / "a", "singleton_3d-s0") == ["stage0a", "stage0b", "stage1",
                                                         "stage2", "stage3"]
  for name in ("sd3-s0", "singleton-s0", "vanilla_dual-s0", "singleton_3d-s0"):
    assert sorted(p.name for p in (results / name).iterdir()) == [
        "config.json", "eval_examples.json", "summary.json"]  # no checkpoints
  assert calls[-1][:3] == ["-m", "sd3_jax.report", f"--out={results}"]
  assert len(calls[-1][3:]) == 4

  # Another machine, a fresh OUT: seed 0 comes back from RESULTS untrained, seed 1 trains,
  # and the table covers both.
  run, calls = _ablation(tmp_path, "b", "0 1", results)
  assert run.returncode == 0, run.stderr
  trained = [c for c in calls if c[1] == "sd3_jax.main"]
  assert {c[3] for c in trained} == {"--config.seed=1"} and len(trained) == 4
  assert "sd3 seed 0: done, skipping" in run.stdout
  assert sorted(pathlib.Path(d).name for d in calls[-1][3:]) == sorted(
      f"{v}-s{s}" for v in ("sd3", "singleton", "vanilla_dual", "singleton_3d") for s in (0, 1))

  # Runs finished in OUT before RESULTS was set are kept by the next call that sets it.
  shutil.rmtree(results)
  run, calls = _ablation(tmp_path, "b", "1", results)
  assert run.returncode == 0, run.stderr
  assert not [c for c in calls if c[1] == "sd3_jax.main"]
  assert sorted(p.name for p in results.iterdir()) == [
      "sd3-s1", "singleton-s1", "singleton_3d-s1", "vanilla_dual-s1"]


def test_ablation_names_the_missing_checkpoints_of_a_run_kept_without_its_seed(tmp_path):
  results = tmp_path / "kept"
  run, _ = _ablation(tmp_path, "a", "3", results)
  assert run.returncode == 0, run.stderr
  for name in ("singleton-s3", "vanilla_dual-s3", "singleton_3d-s3"):
    shutil.rmtree(results / name)
  run, calls = _ablation(tmp_path, "b", "3", results)
  assert run.returncode == 1
  assert f"{tmp_path / 'b' / 'sd3-s3'}/checkpoints/stage0a is missing" in run.stderr
  assert f"delete {results}/sd3-s3 to retrain it" in run.stderr
  assert not [c for c in calls if c[1] == "sd3_jax.main"]
