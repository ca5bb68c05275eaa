"""The launch scripts: --dry-run prints exactly the commands a real run executes, and their
quoting delivers every training argument intact, through ssh's remote shell too."""

import os
import subprocess
import sys
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = ["launch/tpu/create.sh", "launch/tpu/setup.sh", "launch/tpu/run.sh",
           "launch/tpu/worker.sh", "launch/tpu/logs.sh", "launch/tpu/delete.sh",
           "launch/gpu/run.sh", "launch/gpu/slurm.sh", "launch/gpu/slurm.sbatch"]
TRAIN = ["--config=configs/finetune.py:7b", "--workdir=gs://bucket/valley/ft7b"]
# Spaces, quotes, $ and globs: what a --config.data.train override can hold.
HAIRY = TRAIN + ["--config.data.train=[{'path': 'gs://b/it is.json', 'weight': 2}]",
                 'a "$HOME" *']
GPU_FLAGS = ("--xla_gpu_enable_latency_hiding_scheduler=true "
             "--xla_gpu_enable_pipelined_all_gather=true "
             "--xla_gpu_enable_pipelined_reduce_scatter=true "
             "--xla_gpu_enable_pipelined_all_reduce=true "
             "--xla_gpu_all_gather_combine_threshold_bytes=134217728 "
             "--xla_gpu_reduce_scatter_combine_threshold_bytes=134217728 "
             "--xla_gpu_all_reduce_combine_threshold_bytes=134217728 "
             "--xla_gpu_enable_command_buffer=FUSION,CUSTOM_CALL")


def env(**extra):
    base = {k: v for k, v in os.environ.items()
            if k not in ("XLA_FLAGS", "TPU_NAME", "VALLEY_TPU_METADATA")}
    return {**base, "HOME": "/home/me", **extra}


def sh(script, *args, check=True, **extra_env):
    out = subprocess.run(["bash", os.path.join(ROOT, script), *args], cwd="/", env=env(**extra_env),
                         capture_output=True, text=True, timeout=60)
    if check:
        assert out.returncode == 0, out.stderr
    return out


def dry(script, *args, **extra_env):
    return sh(script, "--dry-run", *args, **extra_env).stdout.splitlines()


def argv_of(line, stub):
    """The argv that bash would give `stub` when it runs `line` (stub defined as a function
    that prints its arguments NUL-separated)."""
    program = f'{stub}() {{ printf "%s\\0" "$@"; }}\ncd() {{ :; }}\nnohup() {{ "$@"; }}\n{line}'
    out = subprocess.run(["bash", "-c", program], capture_output=True, text=True, check=True,
                         env=env())
    return out.stdout.split("\0")[:-1]


@pytest.mark.parametrize("script", SCRIPTS)
def test_every_script_is_strict_and_has_help(script):
    text = open(os.path.join(ROOT, script)).read()
    assert "set -euo pipefail" in text and "--dry-run" in text
    out = sh(script, "--help")
    assert out.stdout.startswith("Usage:")
    assert os.access(os.path.join(ROOT, script), os.X_OK)


def test_tpu_create_spot_and_wait():
    assert dry("launch/tpu/create.sh", "--name=valley", "--accelerator=v5p-16",
               "--zone=us-east5-a", "--project=proj", "--spot", "--wait") == [
        "gcloud compute tpus queued-resources create valley --node-id=valley "
        "--accelerator-type=v5p-16 --runtime-version=v2-alpha-tpuv5 --zone=us-east5-a "
        "--project=proj --spot",
        "# every 30 s until ACTIVE:",
        "gcloud compute tpus queued-resources describe valley --zone=us-east5-a --project=proj "
        "'--format=value(state.state)'"]


def test_tpu_create_names_v5e_as_gcloud_does():
    assert dry("launch/tpu/create.sh", "--accelerator", "v5e-16", TPU_NAME="lite") == [
        "gcloud compute tpus queued-resources create lite --node-id=lite "
        "--accelerator-type=v5litepod-16 --runtime-version=v2-alpha-tpuv5-lite"]


def test_tpu_setup_ships_the_working_tree_to_every_worker():
    assert dry("launch/tpu/setup.sh", "--name=valley", "--zone=z") == [
        f"bash -c 'git -C {ROOT} ls-files -z --cached --others --exclude-standard | "
        f"tar -czf /tmp/valley_jax-valley.tar.gz -C {ROOT} --null -T -'",
        "gcloud compute tpus tpu-vm scp /tmp/valley_jax-valley.tar.gz valley:valley_jax.tar.gz "
        "--worker=all --zone=z",
        "gcloud compute tpus tpu-vm ssh valley --worker=all --zone=z '--command=set -euo pipefail"
        " && rm -rf ~/valley_jax && mkdir -p ~/valley_jax && tar -xzf ~/valley_jax.tar.gz -C "
        "~/valley_jax && python3 -m pip install --user --quiet uv==0.13.9 && (test -x "
        "~/valley_venv/bin/python || ~/.local/bin/uv venv --python 3.11 ~/valley_venv) && "
        "~/.local/bin/uv pip install --python ~/valley_venv/bin/python -e "
        "\"$HOME/valley_jax[tpu]\" && ~/valley_venv/bin/python -c "
        "'\\''import jax, valley_jax; print(jax.__version__)'\\'''"]


def test_tpu_run_starts_the_worker_script_everywhere():
    assert dry("launch/tpu/run.sh", "--name=valley", "--zone=z", "--project=p",
               "--env=LIBTPU_INIT_ARGS=--xla_tpu_enable_async_collective_fusion=true", "--",
               *TRAIN) == [
        "gcloud compute tpus tpu-vm ssh valley --worker=all --zone=z --project=p "
        "'--command=cd ~/valley_jax && bash launch/tpu/worker.sh "
        "--env=LIBTPU_INIT_ARGS=--xla_tpu_enable_async_collective_fusion=true -- "
        "--config=configs/finetune.py:7b --workdir=gs://bucket/valley/ft7b'"]
    assert dry("launch/tpu/run.sh", "--name=valley", "--stop") == [
        "gcloud compute tpus tpu-vm ssh valley --worker=all "
        "'--command=cd ~/valley_jax && bash launch/tpu/worker.sh --stop'"]


def test_tpu_run_delivers_hairy_training_arguments_intact():
    (line,) = dry("launch/tpu/run.sh", "--name=valley", "--", *HAIRY)
    argv = argv_of(line, "gcloud")
    assert argv[:5] == ["compute", "tpus", "tpu-vm", "ssh", "valley"]
    remote = argv[-1].removeprefix("--command=")
    assert argv_of(remote, "bash") == ["launch/tpu/worker.sh", "--", *HAIRY]


def test_tpu_worker_joins_a_multi_worker_slice(tmp_path):
    (tmp_path / "agent-worker-number").write_text("1")
    (tmp_path / "worker-network-endpoints").write_text("w-0:0:10.0.0.2,w-1:1:10.0.0.3")
    assert dry("launch/tpu/worker.sh", "--", *TRAIN, VALLEY_TPU_METADATA=f"file://{tmp_path}") == [
        "nohup env JAX_COORDINATOR_ADDRESS=10.0.0.2:8476 JAX_NUM_PROCESSES=2 JAX_PROCESS_ID=1 "
        "/home/me/valley_venv/bin/python -m valley_jax.train --config=configs/finetune.py:7b "
        "--workdir=gs://bucket/valley/ft7b < /dev/null > /home/me/valley_train.log 2>&1 &"]


def test_tpu_worker_alone_needs_no_coordinator(tmp_path):
    (tmp_path / "agent-worker-number").write_text("0")
    (tmp_path / "worker-network-endpoints").write_text("10.0.0.2")
    assert dry("launch/tpu/worker.sh", "--env=A=b c", "--", *TRAIN,
               VALLEY_TPU_METADATA=f"file://{tmp_path}") == [
        "nohup env 'A=b c' /home/me/valley_venv/bin/python -m valley_jax.train "
        "--config=configs/finetune.py:7b --workdir=gs://bucket/valley/ft7b "
        "< /dev/null > /home/me/valley_train.log 2>&1 &"]


def test_tpu_logs_and_delete():
    assert dry("launch/tpu/logs.sh", "--name=valley", "--worker=3", "--lines=20") == [
        "gcloud compute tpus tpu-vm ssh valley --worker=3 '--command=tail -n 20 -F "
        "~/valley_train.log'"]
    assert dry("launch/tpu/delete.sh", "--name=valley", "--zone=z", "--project=p") == [
        "gcloud compute tpus queued-resources delete valley --zone=z --project=p --force --quiet"]


def test_gpu_one_host():
    assert dry("launch/gpu/run.sh", "--", *TRAIN) == [
        f"env 'XLA_FLAGS={GPU_FLAGS}' XLA_PYTHON_CLIENT_MEM_FRACTION=0.9 python -m "
        "valley_jax.train --config=configs/finetune.py:7b --workdir=gs://bucket/valley/ft7b"]


def test_gpu_hosts_with_a_coordinator_keep_the_callers_xla_flags_last():
    (line,) = dry("launch/gpu/run.sh", "--gpus=0,1,2,3", "--coordinator=10.0.0.1:8476",
                  "--num-processes=2", "--process-id=1", "--python=/opt/venv/bin/python", "--",
                  *TRAIN, XLA_FLAGS="--xla_dump_to=/tmp/dump")
    assert line == (
        f"env 'XLA_FLAGS={GPU_FLAGS} --xla_dump_to=/tmp/dump' XLA_PYTHON_CLIENT_MEM_FRACTION=0.9 "
        "CUDA_VISIBLE_DEVICES=0,1,2,3 JAX_COORDINATOR_ADDRESS=10.0.0.1:8476 JAX_NUM_PROCESSES=2 "
        "JAX_PROCESS_ID=1 /opt/venv/bin/python -m valley_jax.train "
        "--config=configs/finetune.py:7b --workdir=gs://bucket/valley/ft7b")
    assert argv_of(line, "env")[-len(TRAIN):] == TRAIN


def test_gpu_run_needs_all_three_multi_host_flags():
    out = sh("launch/gpu/run.sh", "--dry-run", "--coordinator=10.0.0.1:8476", "--", *TRAIN,
             check=False)
    assert out.returncode == 2 and "go together" in out.stderr


def test_gpu_slurm_submits_one_task_per_gpu():
    assert dry("launch/gpu/slurm.sh", "--nodes=4", "--partition=a3", "--account=acct",
               "--time=2-00:00:00", "--", *TRAIN) == [
        f"sbatch --job-name=valley --nodes=4 --ntasks-per-node=8 --gpus-per-node=8 --exclusive "
        f"--chdir={ROOT} --output=logs/%x-%j.out --signal=TERM@300 --partition=a3 "
        f"--account=acct --time=2-00:00:00 {ROOT}/launch/gpu/slurm.sbatch -- "
        "--config=configs/finetune.py:7b --workdir=gs://bucket/valley/ft7b"]


def test_gpu_slurm_job_body_runs_srun_from_the_repository():
    out = subprocess.run(["bash", "launch/gpu/slurm.sbatch", "--dry-run", "--", *HAIRY], cwd=ROOT,
                         env=env(), capture_output=True, text=True, check=True)
    (line,) = out.stdout.splitlines()
    assert line.startswith("srun --kill-on-bad-exit=1 launch/gpu/run.sh -- ")
    assert argv_of(line, "srun") == ["--kill-on-bad-exit=1", "launch/gpu/run.sh", "--", *HAIRY]


def test_missing_training_arguments_are_a_usage_error():
    for script, args in [("launch/tpu/run.sh", ["--name=v"]), ("launch/gpu/run.sh", []),
                         ("launch/gpu/slurm.sh", ["--nodes=2"])]:
        out = sh(script, "--dry-run", *args, check=False)
        assert out.returncode == 2 and "no training arguments" in out.stderr


def test_tpu_worker_runs_in_the_background_once_and_stops_on_sigterm(tmp_path):
    (tmp_path / "agent-worker-number").write_text("0")
    (tmp_path / "worker-network-endpoints").write_text("10.0.0.2")
    fake_python = tmp_path / "python"
    fake_python.write_text('#!/bin/sh\necho started "$@"\nexec sleep 60\n')
    fake_python.chmod(0o755)
    where = dict(HOME=str(tmp_path), VALLEY_TPU_METADATA=f"file://{tmp_path}")
    out = sh("launch/tpu/worker.sh", f"--python={fake_python}", "--", *TRAIN, **where)
    assert out.stdout.startswith("worker 0 of 1: training started (pid ")
    pid = int((tmp_path / "valley_train.pid").read_text())
    log = tmp_path / "valley_train.log"
    for _ in range(100):
        if log.exists() and log.read_text():
            break
        time.sleep(0.05)
    assert log.read_text() == "started -m valley_jax.train " + " ".join(TRAIN) + "\n"

    again = sh("launch/tpu/worker.sh", f"--python={fake_python}", "--", *TRAIN, check=False,
               **where)
    assert again.returncode == 2 and f"already runs here (pid {pid})" in again.stderr

    sh("launch/tpu/worker.sh", "--stop", **where)
    for _ in range(100):
        if not alive(pid):
            break
        time.sleep(0.05)
    assert not alive(pid)
    assert sh("launch/tpu/worker.sh", "--stop", **where).stdout == "no training running on this worker\n"


def alive(pid: int) -> bool:
    """Running, not merely a zombie waiting for its (re)parent to reap it."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_gpu_xla_flags_exist_in_this_jaxlib():
    """XLA aborts at start-up on a flag it does not know; the flags are parsed on any backend."""
    flags = sh("launch/gpu/run.sh", "--print-xla-flags").stdout.strip()
    assert flags == GPU_FLAGS
    out = subprocess.run([sys.executable, "-c", "import jax; print(jax.numpy.ones(3).sum())"],
                         env=env(XLA_FLAGS=flags, JAX_PLATFORMS="cpu"), capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "3.0", out.stderr[-2000:]
    bad = subprocess.run([sys.executable, "-c", "import jax; jax.numpy.ones(3)"],
                         env=env(XLA_FLAGS="--xla_gpu_no_such_flag=true", JAX_PLATFORMS="cpu"),
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode != 0 and "Unknown flag" in bad.stderr
