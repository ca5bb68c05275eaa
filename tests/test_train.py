"""The trainer: resume after kill -9 is bitwise exact, SIGTERM checkpoints, damaged checkpoints
fall back, and two processes equal one."""

import glob
import gzip
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from valley_jax import checkpoint, hf, malloc

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = [  # the demo config, smaller: a few steps on a tiny synthetic world
    "--config.total_steps=8", "--config.checkpoint_every=2", "--config.eval_every=1000",
    "--config.log_every=2", "--config.batch_size=4", "--config.data.synthetic_num_train=24",
    "--config.data.val_batches=1", "--config.data.num_workers=0", "--config.data.max_length=160",
    "--config.model.num_frames=4", "--config.keep_checkpoints=10",
    "--config.init.vision_pretrain_steps=0",  # tested on its own in test_vision_pretrain.py
]


def train_cmd(workdir, *extra, config="configs/pretrain.py:demo"):
    return [sys.executable, "-m", "valley_jax.train", f"--config={os.path.join(ROOT, config)}",
            f"--workdir={workdir}", *TINY, *extra]


def env():
    e = dict(os.environ)
    e["JAX_PLATFORMS"] = "cpu"
    e["XLA_FLAGS"] = "--xla_force_host_platform_device_count=1"
    return e


def run_to_end(workdir, *extra):
    out = subprocess.run(train_cmd(workdir, *extra), cwd=ROOT, env=env(), capture_output=True,
                         text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return out.stdout + out.stderr


def steps(workdir):
    d = os.path.join(workdir, "checkpoints")
    return sorted(int(n) for n in os.listdir(d) if n.isdigit()) if os.path.isdir(d) else []


def final_params(workdir):
    return hf.get_flat(checkpoint.load_model(os.path.join(workdir, "model")))


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("full"))
    # Profiled (steps 3-4): the resumed runs below, which are not, must still end bitwise equal.
    log = run_to_end(workdir, "--config.profile.start_step=2", "--config.profile.num_steps=2")
    return workdir, log


def test_progress_lines_metrics_and_final_model(uninterrupted):
    workdir, log = uninterrupted
    assert "step 8/8 loss" in log and "MFU" in log and "ETA" in log
    assert "memory allocator: " in log
    library = malloc.find()
    if library:  # `python -m valley_jax.train` switched to it before importing jax
        assert f"memory allocator: {'jemalloc' if 'jemalloc' in library else 'tcmalloc'}" in log
    lines = [json.loads(l) for l in open(os.path.join(workdir, "metrics.jsonl"))]
    train = [l for l in lines if l["kind"] == "train"]
    assert [l["step"] for l in train] == [2, 4, 6, 8]
    assert all(np.isfinite(l["loss"]) and l["tokens_per_s"] > 0 for l in train)
    assert [l for l in lines if l["kind"] == "eval"][-1]["val_loss"] > 0
    assert steps(workdir) == [2, 4, 6, 8]
    assert os.listdir(os.path.join(workdir, "tensorboard"))
    assert json.load(open(os.path.join(workdir, "config.json")))["total_steps"] == 8


def test_profile_traces_the_configured_steps(uninterrupted):
    workdir, log = uninterrupted
    assert f"profile of steps 3-4 written to {os.path.join(workdir, 'profile')}" in log
    traces = glob.glob(os.path.join(workdir, "profile", "**", "*.trace.json.gz"), recursive=True)
    assert traces, os.listdir(os.path.join(workdir, "profile"))
    events = json.load(gzip.open(traces[0]))["traceEvents"]
    # The train step's jitted function, called once per traced step (each call is traced at two
    # levels, one span inside the other).
    calls = [e for e in events if e.get("ph") == "X" and e.get("name") == "PjitFunction(step)"]
    outermost = [e for e in calls if not any(
        o is not e and o["ts"] <= e["ts"] and e["ts"] + e["dur"] <= o["ts"] + o["dur"]
        and (o["ts"], -o["dur"]) < (e["ts"], -e["dur"]) for o in calls)]
    assert len(outermost) == 2, [(e["ts"], e["dur"]) for e in calls]


def test_kill_9_then_rerun_resumes_and_ends_bitwise_equal(uninterrupted, tmp_path):
    workdir = str(tmp_path)
    proc = subprocess.Popen(train_cmd(workdir), cwd=ROOT, env=env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 600
    while not any(s >= 4 for s in steps(workdir)) and time.time() < deadline:
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert 4 <= max(steps(workdir)) < 8 or not os.path.exists(os.path.join(workdir, "model"))
    log = run_to_end(workdir)
    assert "resumed from step" in log
    want = final_params(uninterrupted[0])
    got = final_params(workdir)
    assert set(got) == set(want)
    for p in want:
        assert np.array_equal(got[p], want[p]), p


def test_sigterm_writes_a_checkpoint_at_the_current_step(tmp_path):
    workdir = str(tmp_path)
    proc = subprocess.Popen(train_cmd(workdir, "--config.checkpoint_every=1000",
                                      "--config.total_steps=200"),
                            cwd=ROOT, env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    log = ""
    deadline = time.time() + 600
    for line in proc.stdout:
        log += line
        if "step 4/200" in line or time.time() > deadline:
            break
    proc.send_signal(signal.SIGTERM)
    log += proc.stdout.read()
    assert proc.wait(timeout=120) == 128 + signal.SIGTERM
    saved = steps(workdir)
    assert len(saved) == 1 and 4 <= saved[0] < 200, (saved, log[-2000:])
    assert f"checkpointing step {saved[0]}" in log


def test_truncated_latest_checkpoint_falls_back_to_the_previous(uninterrupted, tmp_path):
    import shutil
    workdir = str(tmp_path / "w")
    shutil.copytree(uninterrupted[0], workdir)
    shutil.rmtree(os.path.join(workdir, "model"))
    latest = os.path.join(workdir, "checkpoints", "8")
    damaged = 0
    for dirpath, _, files in os.walk(os.path.join(latest, "state")):
        for name in files:
            path = os.path.join(dirpath, name)
            if os.path.getsize(path) > 64:
                with open(path, "r+b") as f:
                    f.truncate(os.path.getsize(path) // 3)
                damaged += 1
    assert damaged
    log = run_to_end(workdir)
    assert "checkpoint at step 8 is damaged" in log
    assert "resumed from step 6" in log
    want = final_params(uninterrupted[0])
    got = final_params(workdir)
    for p in want:
        assert np.array_equal(got[p], want[p]), p


def test_two_processes_equal_one_process(tmp_path):
    """Two processes with 4 CPU devices each (jax.distributed, local coordinator) train like one
    process with 8 devices: the global batches hold the same records, so the losses and final
    parameters agree up to the order of float reductions."""
    import socket
    common = ["--config.total_steps=3", "--config.checkpoint_every=3", "--config.log_every=1",
              "--config.batch_size=8", "--config.mesh.data=-1"]
    one = str(tmp_path / "one")
    e = env()
    e["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
    out = subprocess.run(train_cmd(one, *common), cwd=ROOT, env=e, capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]

    two = str(tmp_path / "two")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = []
    for pid in range(2):
        e = env()
        e.update(XLA_FLAGS="--xla_force_host_platform_device_count=4",
                 JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES="2",
                 JAX_PROCESS_ID=str(pid))
        procs.append(subprocess.Popen(train_cmd(two, *common), cwd=ROOT, env=e,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    logs = [p.communicate(timeout=600)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], logs[0][-3000:] + logs[1][-3000:]
    assert "2 processes, 8 devices" in logs[0]

    def losses(workdir):
        lines = [json.loads(l) for l in open(os.path.join(workdir, "metrics.jsonl"))]
        return [l["loss"] for l in lines if l["kind"] == "train"]

    assert np.allclose(losses(one), losses(two), atol=1e-5, rtol=0)
    want, got = final_params(one), final_params(two)
    assert max(float(np.max(np.abs(got[p] - want[p]))) for p in want) < 1e-5


def test_dataset_lists_override_from_the_command_line():
    """`--config.data.train='[{...}, ...]'` (the README's form) sets the datasets of a run."""
    from absl import flags
    from ml_collections import config_flags

    from valley_jax import train

    argv = ["train", f"--config={os.path.join(ROOT, 'configs/finetune.py')}:7b",
            '--config.data.train=[{"path": "a.json", "video_root": "/v"}, {"path": "b.json", "weight": 2}]',
            '--config.eval.qa=["q.json"]']
    fv = flags.FlagValues()
    config_flags.DEFINE_config_file("config", flag_values=fv, sys_argv=argv)
    fv(argv)
    config = fv.config
    specs = train.data_config(config, config.data.train, "", "tok", 256, train=True).datasets
    assert [(s.path, s.video_root, s.weight) for s in specs] == [("a.json", "/v", 1.0),
                                                                ("b.json", "", 2.0)]
    assert tuple(config.eval.qa) == ("q.json",)


def test_the_decoders_attention_blocks_come_from_the_config():
    import importlib.util

    from valley_jax import train
    from valley_jax.layers import Policy

    spec = importlib.util.spec_from_file_location("finetune",
                                                  os.path.join(ROOT, "configs/finetune.py"))
    finetune = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(finetune)
    # The demo's 168 tokens in three blocks of 56; the 7B recipe keeps the default of 512.
    assert train.policy_from(finetune.get_config("demo")).attention_block == 56
    assert train.policy_from(finetune.get_config("7b")).attention_block == 512
    assert Policy().attention_block == 512
    config = finetune.get_config("demo")
    config.model.attention_block = 0
    with pytest.raises(ValueError, match="config.model.attention_block must be a whole number"):
        train.check_config(config)


def test_an_interval_of_zero_is_refused_before_any_work(tmp_path):
    """`--config.eval_every=0` used to crash with ZeroDivisionError after the first step."""
    out = subprocess.run(train_cmd(str(tmp_path / "run"), "--config.eval_every=0"), cwd=ROOT,
                         env=env(), capture_output=True, text=True, timeout=600)
    assert out.returncode != 0
    assert "config.eval_every must be a whole number of at least 1, got 0" in out.stderr
    assert not os.path.exists(tmp_path / "run")  # refused before the workdir is made


def test_accuracy_table_prints_chance_levels(tmp_path):
    from valley_jax import train

    (tmp_path / "meta.json").write_text(json.dumps({"chance": {"colour": 1 / 6, "count": 0.5}}))
    acc = {"all": {"exact": 0.75, "n": 4}, "colour": {"exact": 1.0, "n": 2},
           "count": {"exact": 0.5, "n": 2}}
    assert train.accuracy_table("val", acc, train.chance_levels(str(tmp_path))) == (
        "held-out answer accuracy, val (4 questions):\n"
        "  all            0.750   n=4\n"
        "  colour         1.000   n=2      chance 0.167\n"
        "  count          0.500   n=2      chance 0.500")
    assert train.chance_levels(str(tmp_path / "absent")) == {}


def test_an_init_checkpoint_of_another_architecture_is_refused(uninterrupted):
    """A stage-1 model with one LLM layer more than the run's: a clear error naming the
    checkpoint and the parameters, not its stacked layers written into the smaller model."""
    import dataclasses

    import ml_collections

    from valley_jax import train
    from valley_jax.layers import Policy

    path = os.path.join(uninterrupted[0], "model")
    saved = checkpoint.load_config(path)
    config = ml_collections.ConfigDict(dict(seed=0))
    loaded = hf.get_flat(train.build_model(config, saved, Policy(), path))
    for p, v in final_params(uninterrupted[0]).items():
        np.testing.assert_array_equal(loaded[p], v)
    deeper = dataclasses.replace(saved, llm=dataclasses.replace(saved.llm, depth=saved.llm.depth + 1))
    with pytest.raises(ValueError, match=rf"init.checkpoint {path} does not fit") as error:
        train.build_model(config, deeper, Policy(), path)
    depth, width = saved.llm.depth, saved.llm.hidden
    assert f"llm.layers.attn_norm.scale ({depth}, {width}) (the model's: ({depth + 1}, {width}))" \
        in str(error.value)

