"""The Flax Valley model equals the PyTorch reference (transformers + the spec's modules)."""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from safetensors.numpy import load_file, save_file

import torch_reference as ref
from valley_jax import hf
from valley_jax.config import ValleyConfig, from_dict, preset, to_dict
from valley_jax.layers import Policy, attention
from valley_jax.temporal import make_temporal
from valley_jax.valley import Valley, fresh_variables


def max_abs(a, b):
    return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


def rewrite_keys(folder, fn):
    path = folder / "model.safetensors"
    save_file({fn(k): v for k, v in load_file(path).items()}, path, metadata={"format": "pt"})


# ---------------------------------------------------------------------------------------------
# 1. CLIP and LLaMA load from save_pretrained folders and equal transformers


@pytest.mark.parametrize("with_prefix", [True, False])
@pytest.mark.parametrize("select_layer", [-2, -1])
def test_clip_hidden_state_matches_transformers(tmp_path, with_prefix, select_layer):
    model = ref.tiny_clip()
    model.save_pretrained(tmp_path)
    strip = lambda k: k[len("vision_model."):] if k.startswith("vision_model.") else k  # noqa: E731
    rewrite_keys(tmp_path, (lambda k: "vision_model." + strip(k)) if with_prefix else strip)
    keys = load_file(tmp_path / "model.safetensors").keys()
    assert all(k.startswith("vision_model.") == with_prefix for k in keys)

    pixels = torch.randn(3, 3, 56, 56)
    with torch.no_grad():
        want = model(pixel_values=pixels, output_hidden_states=True).hidden_states[select_layer]
    ours = hf.load_clip(tmp_path, select_layer=select_layer)
    got = ours(jnp.asarray(pixels.permute(0, 2, 3, 1).numpy()))
    assert got.shape == (3, 17, 32)
    assert max_abs(got, want) < 1e-4


@pytest.mark.parametrize("kv_heads,rope", [
    (4, None),                                              # plain multi-head attention
    (2, {"rope_type": "default", "rope_theta": 500000.0}),  # grouped-query, non-default theta
    (1, {"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0}),
])
def test_llama_logits_match_transformers(tmp_path, kv_heads, rope):
    kw = dict(num_key_value_heads=kv_heads)
    if rope is not None:
        kw["rope_parameters"] = rope
    model = ref.tiny_llama(**kw)
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    # Blocks of 8 over 24 tokens: the blockwise causal attention is exercised too.
    ours = hf.load_llama(tmp_path, Policy(attention_block=8))
    assert ours.cfg.kv_heads == kv_heads
    assert ours.cfg.rope_theta == (rope or {}).get("rope_theta", saved.get("rope_theta", 10000.0))

    ids = torch.randint(0, 100, (2, 24))
    mask = torch.ones_like(ids)
    mask[1, 17:] = 0  # right padding
    with torch.no_grad():
        want = model(input_ids=ids, attention_mask=mask).logits.numpy()
    positions = jnp.broadcast_to(jnp.arange(24), (2, 24))
    x = ours.embed_tokens(jnp.asarray(ids.numpy()))
    got, _ = ours(x, positions, jnp.asarray(mask.numpy(), bool))
    valid = mask.numpy().astype(bool)
    assert max_abs(np.asarray(got)[valid], want[valid]) < 1e-4


# ---------------------------------------------------------------------------------------------
# 2. Temporal modules equal the spec's PyTorch modules


def tiny_valley_config(temporal: str, clip, llama) -> ValleyConfig:
    return ValleyConfig(
        vision=hf.vision_config_from_hf(clip.config.to_dict()),
        llm=hf.llama_config_from_hf(llama.config.to_dict()),
        temporal=temporal, im_patch_id=ref.IM_PATCH_ID, vi_frame_id=ref.VI_FRAME_ID)


@pytest.mark.parametrize("kind", ["mean", "importance", "transformer"])
def test_temporal_modules_match_reference(kind):
    n, h, t = 16, 64, 8
    torch_mod = ref.TemporalReference(kind, n, h, seed=3)
    cfg = dataclasses.replace(tiny_valley_config(kind, ref.tiny_clip(), ref.tiny_llama()))
    ours = nnx.eval_shape(lambda: make_temporal(cfg, Policy(), nnx.Rngs(0)))
    sd = {k: v.detach().numpy() for k, v in torch_mod.valley_state_dict().items()}
    entries = [dataclasses.replace(e, path=e.path[1:]) for e in hf.temporal_entries(cfg)]
    packed = {k: [dataclasses.replace(e, path=e.path[1:]) for e in v]
              for k, v in hf.packed_in_proj(cfg).items()}
    if entries or packed:
        hf.set_flat(ours, hf.assemble(entries, sd.__getitem__, hf.flat_shapes(ours), packed))

    patches = torch.randn(2, t, n, h)
    want = np.stack([torch_mod(p).detach().numpy() for p in patches])
    mask = jnp.ones((2, t), bool)
    got = ours(jnp.asarray(patches.numpy()), mask)
    assert max_abs(got, want) < 1e-5

    # Padding frames change nothing: the first sample with only its first 3 frames valid equals
    # the reference on those 3 frames.
    short = torch_mod(patches[0, :3]).detach().numpy()
    padded = ours(jnp.asarray(patches.numpy()), mask.at[0, 3:].set(False))
    assert max_abs(padded[0], short) < 1e-5


# ---------------------------------------------------------------------------------------------
# 3. The whole Valley forward on a mixed batch equals the PyTorch assembly


def mixed_batch(num_patches, num_frames, seq_len=120, seed=0):
    """[video with T frames, image, text-only], right padded, as the data pipeline lays it out."""
    rng = np.random.default_rng(seed)
    video = [1, 5, 6] + ref.media_ids(num_patches, num_frames) + list(rng.integers(3, 100, 30))
    image = [1, 7] + ref.media_ids(num_patches, 1) + list(rng.integers(3, 100, 20))
    text = [1] + list(rng.integers(3, 100, 50))
    rows = [video, image, text]
    ids = np.zeros((3, seq_len), np.int32)
    mask = np.zeros((3, seq_len), np.int32)
    for i, r in enumerate(rows):
        ids[i, :len(r)], mask[i, :len(r)] = r, 1
    frames = rng.integers(0, 256, (3, num_frames, 56, 56, 3), dtype=np.uint8)
    frame_mask = np.zeros((3, num_frames), bool)
    frame_mask[0], frame_mask[1, 0] = True, True
    frames[1, 1:] = 0
    frames[2] = 0
    return ids, mask, frames, frame_mask


def build_pair(kind, seed=0):
    clip, llama = ref.tiny_clip(seed), ref.tiny_llama(seed + 1)
    torch_model = ref.ValleyReference(clip, llama, ref.TemporalReference(kind, 16, 64, seed + 2))
    cfg = tiny_valley_config(kind, clip, llama)
    sd = {k: v.numpy() for k, v in torch_model.valley_state_dict().items()}
    return torch_model, hf.valley_from_tensors(cfg, sd.keys(), sd.__getitem__), cfg


@pytest.mark.parametrize("kind", ["mean", "importance", "transformer"])
def test_valley_forward_matches_reference(kind):
    torch_model, model, cfg = build_pair(kind)
    ids, mask, frames, frame_mask = mixed_batch(cfg.vision.num_patches, 8)
    pixels = [ref.normalise(frames[0]), ref.normalise(frames[1, :1]), None]
    want = torch_model(torch.from_numpy(ids).long(), pixels, torch.from_numpy(mask)).numpy()
    got, _ = nnx.jit(lambda m, *a: m(*a))(model, ids, frames, frame_mask, mask)
    valid = mask.astype(bool)
    assert max_abs(np.asarray(got)[valid], want[valid]) < 1e-4


# ---------------------------------------------------------------------------------------------
# 4. Decoding with the KV cache gives the full forward's logits


def test_kv_cache_decoding_matches_full_forward():
    _, model, cfg = build_pair("transformer", seed=5)
    ids, mask, frames, frame_mask = mixed_batch(cfg.vision.num_patches, 8, seq_len=70)
    ids, mask = ids[:2], mask[:2]  # a video (61 tokens) and an image (43 tokens) prompt
    frames, frame_mask = frames[:2], frame_mask[:2]
    full, _ = model(ids, frames, frame_mask, mask)

    prefill = 40
    cache = model.llm.init_cache(batch=2, max_len=72)
    logits, cache = model(ids[:, :prefill], frames, frame_mask, mask[:, :prefill], cache=cache)
    steps = [logits]
    step = nnx.jit(lambda m, tok, tm, pos, c: m(tok, attention_mask=tm, positions=pos, cache=c))
    positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
    for i in range(prefill, ids.shape[1]):
        logits, cache = step(model, ids[:, i:i + 1], mask[:, i:i + 1], positions[:, i:i + 1], cache)
        steps.append(logits)
    assert int(cache["index"]) == ids.shape[1]
    decoded = np.concatenate([np.asarray(s) for s in steps], axis=1)
    valid = mask.astype(bool)
    assert max_abs(decoded[valid], np.asarray(full)[valid]) < 1e-4


# ---------------------------------------------------------------------------------------------
# 5. Real sizes build abstractly with the published parameter counts


def count(tree):
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


@pytest.mark.parametrize("name,llm_params", [("7b", 6.74e9), ("13b", 13.0e9)])
def test_real_size_parameter_counts(name, llm_params):
    cfg = preset(name)
    model = nnx.eval_shape(lambda: Valley(cfg, Policy(param_dtype=jnp.bfloat16), rngs=nnx.Rngs(0)))
    vision = count(nnx.state(model.vision, nnx.Param))
    llm = count(nnx.state(model.llm, nnx.Param))
    assert abs(vision / 303.2e6 - 1) < 0.005, vision
    assert abs(llm / llm_params - 1) < 0.005, llm
    assert count(nnx.state(model.projector, nnx.Param)) == 1024 * cfg.llm.hidden + cfg.llm.hidden
    assert cfg.vision.num_patches == 256 and cfg.vision.layers_to_run == 23


def test_fresh_weights_follow_init_std():
    """Real-size presets keep CLIP's and LLaMA's 0.02; the demo, trained from scratch, draws its
    narrow towers at width ** -0.5. Configs saved before the field existed still load."""
    assert preset("7b").vision.init_std == preset("7b").llm.init_std == 0.02
    cfg = preset("demo")
    model = Valley(cfg, rngs=nnx.Rngs(0))
    for weights, std in [(model.vision.layers.fc1.kernel, 64 ** -0.5),
                         (model.vision.patch_embed, 64 ** -0.5),
                         (model.llm.layers.q.kernel, 128 ** -0.5),
                         (model.llm.embed, 128 ** -0.5)]:
        assert float(np.std(np.asarray(weights[...]))) == pytest.approx(std, rel=0.05)
    old = to_dict(cfg)
    del old["vision"]["init_std"], old["llm"]["init_std"]
    assert from_dict(old).llm.init_std == 0.02


def test_fresh_variables_are_the_eager_models_values():
    """The variables a checkpoint lacks are initialised alone (one compiled program), with the
    values the whole model made eagerly gives them."""
    _, _, cfg = build_pair("transformer", seed=2)
    eager = hf.get_flat(Valley(cfg, rngs=nnx.Rngs(7)))
    paths = sorted(p for p in eager if p[0] == "temporal") + [("llm", "lm_head", "kernel")]
    fresh = fresh_variables(cfg, Policy(), 7, paths)
    assert list(fresh) == paths and len(paths) > 10
    for p in paths:
        assert fresh[p].shape == eager[p].shape
        np.testing.assert_allclose(fresh[p], eager[p], rtol=0, atol=1e-6)
    assert not np.allclose(fresh_variables(cfg, Policy(), 8, paths[-1:])[paths[-1]], eager[paths[-1]])
    assert fresh_variables(cfg, Policy(), 7, []) == {}


@pytest.mark.parametrize("mask_rows", [None, 1, 6])
def test_blocked_attention_equals_dot_product_attention(mask_rows):
    """The CPU's blocked attention (spans of query rows, written-out backward) gives
    jax.nn.dot_product_attention's outputs and gradients, with per-row masks, a shared mask,
    grouped-query heads, a query that sees no key, and 1, 2 or 10 spans."""
    batch = 6
    rng = np.random.default_rng(0)
    q = jnp.asarray(rng.normal(size=(batch, 5, 4, 8)), jnp.float32)
    k, v = (jnp.asarray(rng.normal(size=(batch, 7, 2, 8)), jnp.float32) for _ in range(2))
    mask = None if mask_rows is None else jnp.asarray(rng.random((mask_rows, 1, 5, 7)) < 0.7)
    if mask is not None:
        mask = mask.at[..., 0].set(True).at[0, 0, 3].set(False)  # row 0, query 3 sees nothing

    def loss(q, k, v, blk):
        return jnp.sum(jnp.sin(attention(q, k, v, mask, cpu_block=blk)))

    want = jax.nn.dot_product_attention(q, k, v, mask=mask, implementation="xla")
    want_grads = jax.grad(loss, (0, 1, 2))(q, k, v, 0)
    assert jnp.array_equal(attention(q, k, v, mask), want)  # cpu_block=0: the same call
    for block in (10, 5, 1):  # 2 heads x 5 queries per key group: 1, 2 and 10 spans
        got = jax.jit(attention, static_argnames="cpu_block")(q, k, v, mask, cpu_block=block)
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)
        for g, w in zip(jax.jit(jax.grad(loss, (0, 1, 2)), static_argnums=3)(q, k, v, block),
                        want_grads):
            np.testing.assert_allclose(g, w, rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match=r"mask must be \[B or 1, 1, T, S\], got \(6, 4, 5, 7\)"):
        attention(q, k, v, jnp.ones((6, 4, 5, 7), bool), cpu_block=4)