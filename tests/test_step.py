"""The sharded train step: equal on every mesh, frozen parts untouched, exact accumulation."""

import dataclasses
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from valley_jax import flops, hf, lora, optim, sharding
from valley_jax import step as step_lib
from valley_jax.config import LlamaConfig, LoraConfig, ValleyConfig, VisionConfig
from valley_jax.layers import Policy
from valley_jax.valley import Valley

NEW_ROWS_FROM = 250  # ids >= 250 are Valley's added tokens in this tiny vocabulary


def tiny_config(temporal="transformer", dropout=0.1):
    return ValleyConfig(
        vision=VisionConfig(image_size=56, patch_size=14, width=32, depth=3, heads=4, mlp_dim=64),
        llm=LlamaConfig(vocab_size=256, hidden=64, depth=2, heads=4, kv_heads=2, head_dim=16,
                        mlp_dim=128, max_position=256),
        temporal=temporal, temporal_mlp_dim=64, temporal_dropout=dropout,
        im_patch_id=254, vi_frame_id=251)


def make_batch(cfg, seed, batch=8, seq=48, frames=4):
    """Videos, images and text-only rows, right padded, with learned answer tokens."""
    r = np.random.default_rng(seed)
    n = cfg.vision.num_patches
    ids = r.integers(3, 240, (batch, seq)).astype(np.int32)
    frame_mask = np.zeros((batch, frames), bool)
    attention = np.ones((batch, seq), np.int32)
    for b in range(batch):
        kind = b % 3  # video, image, text
        t = frames if kind == 0 else 1
        if kind < 2:
            ids[b, 1:1 + n + 4 + t] = ([252] + [cfg.im_patch_id] * n + [253, 250]
                                       + [cfg.vi_frame_id] * t + [255])
            frame_mask[b, :t] = True
        attention[b, seq - 1 - b:] = 0
    labels = np.where(np.arange(seq) >= 30, ids, -100).astype(np.int32)
    labels[attention == 0] = -100
    pixels = r.integers(0, 256, (batch, frames, 56, 56, 3), dtype=np.uint8)
    pixels[~frame_mask] = 0
    return dict(input_ids=ids, labels=labels, attention_mask=attention, frames=pixels,
                frame_mask=frame_mask)


def run(cfg, mesh_shape, *, stage="finetune", micro_batches=1, steps=3, batches=None,
        lr=1e-3, dropout_rng=True, max_learned=0):
    devices = jax.devices()[: int(np.prod(mesh_shape))]
    mesh = sharding.make_mesh(*mesh_shape, devices=devices)
    model = Valley(cfg, rngs=nnx.Rngs(0))
    graphdef, params, axes, param_paths = step_lib.split_model(model)
    initial = jax.device_get(params)  # the step donates its state: keep a host copy
    trainable = optim.stage_trainable(stage, param_paths, embed_rows_from=NEW_ROWS_FROM)
    tx, schedule = optim.make_optimizer(lr=lr, total_steps=10, warmup_steps=1, b2=0.95,
                                        weight_decay=0.1)
    fn = step_lib.make_step(graphdef, trainable, tx, schedule, micro_batches=micro_batches,
                            max_learned=max_learned, mesh=mesh)
    state = step_lib.init_state(params, trainable, tx)
    state_sh = step_lib.tree_shardings(state, axes, mesh)
    state = jax.device_put(state, state_sh)
    batches = batches or [make_batch(cfg, i) for i in range(steps)]
    batch_sh = sharding.batch_shardings(batches[0], mesh)
    jitted = step_lib.jit_step(fn, state_sh, batch_sh, mesh)
    losses = []
    for i, b in enumerate(batches):
        rng = jax.random.key(100 + i) if dropout_rng else None
        state, metrics = jitted(state, jax.device_put(b, batch_sh), rng)
        losses.append(float(metrics["loss"]))
    return losses, jax.device_get(state.params), state, initial, metrics


def max_param_diff(a, b):
    return max(float(np.max(np.abs(np.asarray(a[p], np.float64) - np.asarray(b[p], np.float64))))
               for p in a)


@pytest.fixture(scope="module")
def single_device_run():
    return run(tiny_config(), (1, 1, 1))


@pytest.mark.parametrize("mesh_shape", [(8, 1, 1), (1, 8, 1), (2, 2, 2), (1, 4, 2)])
def test_same_losses_and_parameters_on_every_mesh(single_device_run, mesh_shape):
    losses, params, state, _, _ = run(tiny_config(), mesh_shape)
    ref_losses, ref_params = single_device_run[0], single_device_run[1]
    assert np.allclose(losses, ref_losses, atol=1e-5, rtol=0), (losses, ref_losses)
    assert max_param_diff(params, ref_params) < 1e-5
    assert ref_losses[0] > ref_losses[2]  # it learns
    # The parameters really are sharded as the rules say (not silently replicated).
    q = state.params[("llm", "layers", "q", "kernel")].sharding.spec
    data, fsdp, tensor = mesh_shape
    assert q == jax.sharding.PartitionSpec(None, "fsdp" if fsdp > 1 else None,
                                           "tensor" if tensor > 1 else None, None)


def test_stage1_trains_only_projector_and_new_token_rows():
    losses, after, state, before, _ = run(tiny_config(), (2, 2, 2), stage="pretrain", lr=1e-2)
    changed = {p for p in before if not np.array_equal(before[p], after[p])}
    assert changed == {("projector", "linear", "kernel"), ("projector", "linear", "bias"),
                       ("llm", "embed")}
    old, new = before[("llm", "embed")], after[("llm", "embed")]
    assert np.array_equal(old[:NEW_ROWS_FROM], new[:NEW_ROWS_FROM])
    assert not np.array_equal(old[NEW_ROWS_FROM:], new[NEW_ROWS_FROM:])
    # Optimizer moments exist only for the projector and the 6 new rows.
    adam = state.opt_state[1][0]
    assert set(adam.mu) == {("projector", "linear", "kernel"), ("projector", "linear", "bias"),
                            ("llm", "embed")}
    assert adam.mu[("llm", "embed")].shape == (256 - NEW_ROWS_FROM, 64)
    n_state = sum(x.size for x in jax.tree.leaves(state.opt_state))
    n_train = 32 * 64 + 64 + (256 - NEW_ROWS_FROM) * 64
    assert n_state == 2 * n_train + 2  # mu + nu, plus two step counters


# Runs one jitted (2, 2, 2)-mesh stage-1 step many times; XLA aborts the process when a
# collective waits longer than the timeout for its devices.
MANY_STEPS = """
import numpy as np
from test_step import make_batch, run, tiny_config
cfg = tiny_config()
losses = run(cfg, (2, 2, 2), stage="pretrain", lr=1e-2, batches=[make_batch(cfg, 0)] * 500)[0]
print("steps", len(losses), bool(np.isfinite(losses).all()))
"""


def test_many_sharded_steps_do_not_deadlock():
    """Eight fake devices on a 2-core host: without conftest's PJRT_NPROC
    (`sharding.size_cpu_thread_pools`), XLA:CPU's intra-op pool (8 threads) fills with blocked
    collectives within a few hundred of these steps and the process aborts (SIGABRT, "Termination timeout for `all reduce ..."); here none may wait 10 s."""
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=(
        "--xla_force_host_platform_device_count=8"
        " --xla_cpu_collective_call_terminate_timeout_seconds=10"))
    out = subprocess.run([sys.executable, "-c", MANY_STEPS], cwd=os.path.dirname(__file__),
                         env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, (out.returncode, out.stderr[-3000:])
    assert out.stdout.split() == ["steps", "500", "True"]


@pytest.mark.parametrize("env,expected", [
    ({"XLA_FLAGS": "--xla_cpu_use_thunk_runtime=true --xla_force_host_platform_device_count=8"},
     "64"),
    ({"JAX_NUM_CPU_DEVICES": "4"}, "32"),
    ({"XLA_FLAGS": "--xla_force_host_platform_device_count=1"}, None),
    ({}, None),
    ({"XLA_FLAGS": "--xla_force_host_platform_device_count=8", "PJRT_NPROC": "12"}, "12"),
])
def test_cpu_thread_pools_sized_for_fake_devices(env, expected):
    """Several CPU devices get 8 XLA:CPU pool threads each (test_many_sharded_steps_do_not_deadlock
    shows why); a user's PJRT_NPROC stands."""
    sharding.size_cpu_thread_pools(env)
    assert env.get("PJRT_NPROC") == expected


def test_stage2_leaves_the_vision_tower_bitwise_unchanged():
    _, after, state, before, _ = run(tiny_config(), (1, 4, 2), stage="finetune")
    for p in before:
        same = np.array_equal(before[p], after[p])
        if p[0] == "vision" or p == ("temporal", "position"):
            assert same, p
        else:
            assert not same, p
    adam = state.opt_state[1][0]
    assert not any(p[0] == "vision" for p in adam.mu)
    assert ("temporal", "position") not in adam.mu


@pytest.mark.parametrize("k", [2, 4])
def test_accumulating_micro_batches_equals_one_large_batch(k):
    cfg = tiny_config(dropout=0.0)
    batches = [make_batch(cfg, i, batch=8) for i in range(2)]
    one, p_one, *_ = run(cfg, (2, 2, 1), batches=batches, dropout_rng=False)
    acc, p_acc, *_ = run(cfg, (2, 2, 1), batches=batches, micro_batches=k, dropout_rng=False)
    assert np.allclose(one, acc, atol=1e-5, rtol=0)
    assert max_param_diff(p_one, p_acc) < 1e-5


def _loss_case(seed=0, b=4, s=40, h=16, v=50):
    r = np.random.default_rng(seed)
    hidden = jnp.asarray(r.normal(size=(b, s, h)), jnp.float32)
    w = jnp.asarray(r.normal(size=(h, v)), jnp.float32)
    labels = np.full((b, s), -100, np.int32)
    for row, n in enumerate([9, 0, 4, 13][:b]):  # rows learn 9, 0, 4 and 13 tokens
        start = int(r.integers(1, s - n))
        labels[row, start:start + n] = r.integers(0, v, n)
    return hidden, w, jnp.asarray(labels)


@pytest.mark.parametrize("max_learned", [0, 13, 14, 40, 12, 5])
def test_learned_token_loss_equals_full_logits_loss(max_learned):
    """The lm_head on the learned positions alone gives the full-logits loss and gradients, also
    when a row has more learned tokens than max_learned (13 fits the longest row; 12 and 5 do
    not and fall back)."""
    hidden, w, labels = _loss_case()

    def full(hidden, w):
        return step_lib.cross_entropy(hidden @ w, labels)

    def learned(hidden, w):
        return step_lib.learned_token_loss(hidden, lambda x: x @ w, labels, max_learned)

    (ref, n_ref), g_ref = jax.value_and_grad(full, argnums=(0, 1), has_aux=True)(hidden, w)
    (got, n_got), g_got = jax.jit(jax.value_and_grad(learned, argnums=(0, 1), has_aux=True))(hidden, w)
    assert int(n_ref) == int(n_got) == 9 + 4 + 13
    assert abs(float(got) - float(ref)) < 1e-4 * abs(float(ref))
    for a, b in zip(g_ref, g_got):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), atol=1e-5, rtol=0)


@pytest.mark.parametrize("max_learned, gathers", [(13, True), (12, False), (0, False)])
def test_learned_token_loss_runs_the_head_on_learned_rows_only_when_they_fit(max_learned, gathers):
    """A spy head adds 1 to every logit of token 0 when it sees all 40 positions: the loss then
    tells which way ran (the longest row learns 13 tokens)."""
    hidden, w, labels = _loss_case()

    def spy(x):
        return x @ w + (x.shape[1] == 40) * jax.nn.one_hot(0, w.shape[1])

    got = float(jax.jit(lambda h: step_lib.learned_token_loss(h, spy, labels, max_learned)[0])(hidden))
    plain = float(step_lib.cross_entropy(hidden @ w, labels)[0])
    spied = float(step_lib.cross_entropy(spy(hidden), labels)[0])
    assert abs(plain - spied) > 0.1
    assert abs(got - (plain if gathers else spied)) < 1e-4 * plain


def test_gathered_loss_trains_as_the_full_loss_on_a_sharded_mesh():
    cfg = tiny_config(dropout=0.0)
    batches = [make_batch(cfg, i) for i in range(3)]  # rows learn 17 tokens at most
    full, p_full, *_ = run(cfg, (2, 2, 2), batches=batches, dropout_rng=False)
    fast, p_fast, *_ = run(cfg, (2, 2, 2), batches=batches, dropout_rng=False, max_learned=17)
    assert np.allclose(full, fast, atol=1e-5, rtol=0)
    assert max_param_diff(p_full, p_fast) < 1e-5


def test_lora_trains_only_adapters_and_merges_exactly():
    cfg = dataclasses.replace(tiny_config(), llm=dataclasses.replace(
        tiny_config().llm, lora=LoraConfig(rank=4, alpha=8.0, dropout=0.05)))
    _, after, _, before, _ = run(cfg, (2, 2, 2), stage="lora", lr=1e-2)
    for p in before:
        same = np.array_equal(before[p], after[p])
        trains = p[-1] in ("lora_a", "lora_b") or p[0] in ("projector", "temporal")
        if p == ("temporal", "position") or not trains:
            assert same, p
        else:
            assert not same, p
    # rank 4 on q, k, v, o, gate, up, down of 2 layers: (in + out) * rank each.
    per_layer = (64 + 64) + (64 + 32) + (64 + 32) + (64 + 64) + 3 * (64 + 128)
    assert lora.adapter_count(after) == 2 * 4 * per_layer

    model = Valley(cfg, rngs=nnx.Rngs(0))
    hf.set_flat(model, after)
    merged_params, merged_cfg = lora.merge(after, cfg)
    assert merged_cfg.llm.lora is None
    plain = Valley(merged_cfg, rngs=nnx.Rngs(1))
    hf.set_flat(plain, merged_params)
    b = make_batch(cfg, 7)
    args = (b["input_ids"], b["frames"], b["frame_mask"], b["attention_mask"])
    with_adapters, _ = model(*args)
    folded, _ = plain(*args)
    assert float(jnp.max(jnp.abs(with_adapters - folded))) < 1e-5
    assert float(jnp.max(jnp.abs(with_adapters))) > 0.1


@pytest.mark.parametrize("stage,temporal", [("finetune", "transformer"), ("pretrain", "mean"),
                                            ("lora", "importance")])
def test_analytic_flops_match_xla_cost_analysis(stage, temporal):
    """XLA's cost analysis counts a while loop's body once, so the layers are unrolled here.
    The analytic count has matmuls only; XLA also counts elementwise work (norms, softmax,
    activations, the optimizer update), which this matmul-dominated config keeps under 10%."""
    cfg = ValleyConfig(
        vision=VisionConfig(image_size=56, patch_size=14, width=128, depth=2, heads=4, mlp_dim=512),
        llm=LlamaConfig(vocab_size=256, hidden=512, depth=2, heads=8, kv_heads=4, head_dim=64,
                        mlp_dim=2048, lora=LoraConfig() if stage == "lora" else None),
        temporal=temporal, temporal_mlp_dim=512, temporal_dropout=0.0, im_patch_id=254,
        vi_frame_id=251)
    model = Valley(cfg, Policy(scan_layers=False), rngs=nnx.Rngs(0))
    graphdef, params, _, param_paths = step_lib.split_model(model)
    trainable = optim.stage_trainable(stage, param_paths, embed_rows_from=NEW_ROWS_FROM)
    tx, schedule = optim.make_optimizer(lr=1e-3, total_steps=10, warmup_steps=1)
    fn = step_lib.make_step(graphdef, trainable, tx, schedule)
    state = step_lib.init_state(params, trainable, tx)
    batch = make_batch(cfg, 0, batch=4, seq=64, frames=4)
    xla = jax.jit(fn).lower(state, batch, None).compile().cost_analysis()["flops"]
    analytic = flops.step_flops(cfg, batch=4, seq_len=64, num_frames=4, stage=stage)["total"]
    assert abs(analytic / xla - 1) < 0.10, (analytic, xla)


def test_vision_lr_scale_scales_only_the_vision_updates():
    params = {("vision", "w"): jnp.full((3, 2), 0.5), ("vision", "bias"): jnp.zeros((2,)),
              ("llm", "w"): jnp.full((3, 2), -0.25)}
    grads = {p: jnp.arange(v.size, dtype=jnp.float32).reshape(v.shape) - 1.5
             for p, v in params.items()}
    updates = {}
    for scale in (1.0, 0.25):
        tx, _ = optim.make_optimizer(lr=1e-2, total_steps=10, warmup_steps=1, weight_decay=0.1,
                                     vision_lr_scale=scale)
        state = tx.init(params)
        for _ in range(2):  # the second step: past warm-up, weight decay in the update
            u, state = tx.update(grads, state, params)
        updates[scale] = u
    for p in params:
        want = updates[1.0][p] * (0.25 if p[0] == "vision" else 1.0)
        np.testing.assert_array_equal(updates[0.25][p], want, err_msg=str(p))
    assert float(jnp.abs(updates[1.0][("vision", "w")]).min()) > 0
