"""Generation (valley_jax.generate): the KV-cache decode equals the full forward, batches equal
single prompts, stops and EOS end a row where the text says, sampling is seeded, and a session
compiles once per bucket. A tiny random Valley and a small sentencepiece tokenizer are built
here (the builders are shared with test_chat.py); every check is an exact value."""

import dataclasses
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from valley_jax import generate as gen
from valley_jax import hf, lora, tokens
from valley_jax.config import LlamaConfig, LoraConfig, ValleyConfig, VisionConfig
from valley_jax.data import synthetic
from valley_jax.data.text import load_tokenizer
from valley_jax.layers import Policy
from valley_jax.valley import Valley

# ---------------------------------------------------------------------------------------------
# Builders (also used by test_chat.py)

NUM_FRAMES, IMAGE_SIZE = 4, 28  # 2 x 2 patches of 14 px: a media block is 12 tokens


def train_tokenizer(folder: Path) -> Path:
    """A LLaMA-style sentencepiece tokenizer (the synthetic world's trainer) on template text,
    small enough that '###' comes as '###', '▁###', '##', '#' pieces and single bytes."""
    words = ("red green blue square circle triangle moves left right up down first then one two "
             "three what which colour shape way does the it is").split()
    qa = [f"### Human: Which colour is the {w}?\n### Assistant: It is {v}.\n###"
          for w in words for v in words[:6]]
    texts = [tokens.SYSTEM_V1, tokens.SYSTEM_INFERENCE] * 3 + qa + ["# ## #### a##b #x"]
    return synthetic.train_tokenizer(texts, folder, vocab_size=420)


def tiny_config(tokenizer, max_position: int = 512) -> ValleyConfig:
    vision = VisionConfig(image_size=IMAGE_SIZE, patch_size=14, width=16, depth=2, heads=2,
                          mlp_dim=32)
    llm = LlamaConfig(vocab_size=len(tokenizer), hidden=32, depth=2, heads=4, kv_heads=2,
                      head_dim=8, mlp_dim=64, max_position=max_position)
    return ValleyConfig(vision=vision, llm=llm, num_frames=NUM_FRAMES, temporal_mlp_dim=32,
                        im_patch_id=tokenizer.convert_tokens_to_ids(tokens.IM_PATCH),
                        vi_frame_id=tokenizer.convert_tokens_to_ids(tokens.VI_FRAME))


def random_model(cfg: ValleyConfig, seed: int = 0) -> Valley:
    """A Valley with random weights set from numpy (no initialiser to compile: seconds faster),
    wide enough (std 0.2) that greedy decoding does not settle on one token."""
    model = nnx.eval_shape(lambda: Valley(cfg, Policy(), rngs=nnx.Rngs(0)))
    rng = np.random.default_rng(seed)
    flat = {}
    for path, shape in hf.flat_shapes(model).items():
        noise = rng.standard_normal(shape)
        flat[path] = (1 + 0.1 * noise if path[-1] == "scale" else 0.2 * noise).astype(np.float32)
    hf.set_flat(model, flat)
    return model


def random_frames(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, IMAGE_SIZE, IMAGE_SIZE, 3), np.uint8)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    tokenizer = load_tokenizer(str(train_tokenizer(tmp_path_factory.mktemp("tok"))))
    model = random_model(tiny_config(tokenizer))
    return tokenizer, model


def encode(tokenizer, text: str, media_frames: int = 0) -> np.ndarray:
    """BOS + the text's ids, a media block of `media_frames` frames in front when non-zero."""
    if media_frames:
        text = tokens.media_tokens(media_frames, (IMAGE_SIZE // 14) ** 2) + text
    return np.asarray([tokenizer.bos_token_id] + tokenizer.encode(text, add_special_tokens=False),
                      np.int32)


def streamed(*args, **kwargs) -> list[list[int]]:
    """Each row's output tokens from `gen.stream`."""
    steps = np.stack(list(gen.stream(*args, **kwargs)))
    return [[int(t) for t in column if t >= 0] for column in steps.T]


# ---------------------------------------------------------------------------------------------
# Buckets


def test_buckets_are_few_and_hold_their_length():
    assert [gen.bucket(n) for n in (1, 64, 65, 128, 129, 192, 193, 300, 385, 600, 2000, 2049)] == [
        64, 64, 128, 128, 192, 192, 256, 384, 512, 768, 2048, 3072]
    assert len({gen.bucket(n) for n in range(1, 4097)}) == 12


def test_greedy_argmax_is_jnps_argmax_with_ties_infinities_and_nans():
    rng = np.random.default_rng(0)
    x = rng.integers(-3, 4, (64, 1000)).astype(np.float32)  # many ties: the first one wins
    x[1] = -np.inf
    x[2, 5] = x[2, 700] = np.inf
    x[3, 17] = x[3, 900] = np.nan  # argmax takes the first NaN
    x[4] = np.nan
    x[5, -1] = 10.0
    got = np.asarray(jax.jit(gen.argmax)(jnp.asarray(x)))
    assert got.dtype == np.int32
    np.testing.assert_array_equal(got, np.argmax(x, axis=-1))
    assert got[:6].tolist() == [int(np.argmax(x[0])), 0, 5, 17, 0, 999]


# ---------------------------------------------------------------------------------------------
# 1. Greedy decoding with the KV cache is the argmax of the full forward at every step


def test_greedy_cached_decoding_is_the_full_forward_argmax(world):
    tokenizer, model = world
    full_forward = nnx.jit(lambda m, ids, f, fm: m(ids, f, fm)[0])
    prompt = encode(tokenizer, "Which colour is the square?", NUM_FRAMES)
    frames, frame_mask = random_frames(NUM_FRAMES, 1)[None], np.ones((1, NUM_FRAMES), bool)
    sampling = gen.SamplingConfig(max_new_tokens=24)
    out = gen.generate(model, [prompt], frames, frame_mask, sampling=sampling)[0]
    assert len(out) == 24 and len(set(out)) > 5  # a real sequence, not one token repeated
    assert streamed(model, [prompt], frames, frame_mask, sampling=sampling) == [out]
    # The full forward, no cache, over the prompt and all but the last generated token.
    ids = np.concatenate([prompt, out[:-1]])[None]
    logits = np.asarray(full_forward(model, ids, frames, frame_mask))[0]
    assert np.argmax(logits[len(prompt) - 1:], axis=-1).tolist() == out


def test_decode_step_slicing_the_stack_equals_the_copied_layers_and_the_full_forward(world):
    """The decode step as other backends run it (each layer's weights sliced from the stack
    inside the step) gives the logits of the CPU's path (layers copied once) and of the full
    forward at the new token, for a batch of two over a cache filled by the prompt."""
    tokenizer, model = world
    llm = model.llm
    texts = [encode(tokenizer, "Which colour is the square?"),
             encode(tokenizer, "Which shape is the red circle?")]
    prompt = np.stack([t[:min(map(len, texts))] for t in texts])
    b, p = prompt.shape
    positions = np.broadcast_to(np.arange(p), (b, p))
    cache = llm.init_cache(b, 64)
    _, cache = llm(llm.embed_tokens(prompt), positions, np.ones((b, p), bool), cache)
    cache = gen.decode_cache(cache)
    assert len(cache["k"]) == llm.cfg.depth
    assert cache["k"][0].shape == (b * llm.cfg.kv_heads, 64, llm.cfg.head_dim)
    token, pos = jnp.asarray([7, 11], jnp.int32), jnp.full((b,), p, jnp.int32)
    step = nnx.jit(lambda m, layers: gen._decode_forward(m, token, pos, cache, layers)[0])
    sliced = np.asarray(step(llm, None))
    copied = np.asarray(step(llm, gen.split_layers(llm)))
    np.testing.assert_allclose(sliced, copied, rtol=0, atol=1e-6)
    ids = np.concatenate([prompt, np.asarray(token)[:, None]], axis=1)
    full = nnx.jit(lambda m, ids: m(m.embed_tokens(ids), np.broadcast_to(np.arange(p + 1), ids.shape),
                                    np.ones(ids.shape, bool))[0])(llm, ids)
    np.testing.assert_allclose(sliced, np.asarray(full)[:, -1], rtol=0, atol=1e-4)


def test_lora_decoding_is_the_full_forward_argmax_and_the_merged_models(world):
    """With unmerged LoRA adapters in every projection, decoding (fused loop and streamed)
    gives the full forward's argmax and the same tokens as the model with them merged in."""
    tokenizer, _ = world
    cfg = tiny_config(tokenizer)
    cfg = dataclasses.replace(cfg, llm=dataclasses.replace(cfg.llm, lora=LoraConfig(rank=4)))
    model = random_model(cfg, seed=5)  # lora_b random too: the adapters change every product
    params, merged_cfg = lora.merge(hf.get_flat(model), cfg)
    merged = nnx.eval_shape(lambda: Valley(merged_cfg, Policy(), rngs=nnx.Rngs(0)))
    hf.set_flat(merged, params)
    prompt = encode(tokenizer, "Which way does the red square move?", NUM_FRAMES)
    frames, frame_mask = random_frames(NUM_FRAMES, 6)[None], np.ones((1, NUM_FRAMES), bool)
    sampling = gen.SamplingConfig(max_new_tokens=16)
    out = gen.generate(model, [prompt], frames, frame_mask, sampling=sampling)[0]
    assert len(set(out)) > 4
    logits = nnx.jit(lambda m, ids: m(ids, frames, frame_mask)[0])(
        model, np.concatenate([prompt, out[:-1]])[None])
    assert np.argmax(np.asarray(logits)[0, len(prompt) - 1:], axis=-1).tolist() == out
    assert gen.generate(merged, [prompt], frames, frame_mask, sampling=sampling)[0] == out
    assert streamed(model, [prompt], frames, frame_mask, sampling=sampling) == [out]


# ---------------------------------------------------------------------------------------------
# 2. A batch of prompts of different lengths generates what each prompt generates alone


def test_batch_of_different_lengths_equals_each_prompt_alone(world):
    tokenizer, model = world
    prompts = [encode(tokenizer, "the"),  # text only
               encode(tokenizer, "Which way does the red square move? " * 3, NUM_FRAMES),
               encode(tokenizer, "What colour is it? " * 25, 1)]  # an image: one frame
    # Alone, the first two pad to 64 tokens; together all pad to 192.
    assert [len(p) for p in prompts] == [2, 51, 161]
    frames = np.stack([np.zeros((NUM_FRAMES, IMAGE_SIZE, IMAGE_SIZE, 3), np.uint8),
                       random_frames(NUM_FRAMES, 2), random_frames(NUM_FRAMES, 3)])
    frame_mask = np.array([[0] * 4, [1] * 4, [1, 0, 0, 0]], bool)
    sampling = gen.SamplingConfig(max_new_tokens=12)
    batch = gen.generate(model, prompts, frames, frame_mask, sampling=sampling)
    alone = [gen.generate(model, prompts[0:1], sampling=sampling)[0],
             gen.generate(model, prompts[1:2], frames[1:2], frame_mask[1:2], sampling=sampling)[0],
             gen.generate(model, prompts[2:3], frames[2:3, :1], frame_mask[2:3, :1],
                          sampling=sampling)[0]]
    assert batch == alone
    assert all(len(row) == 12 for row in batch) and len({tuple(r) for r in batch}) == 3
    assert streamed(model, prompts, frames, frame_mask, sampling=sampling) == batch


# ---------------------------------------------------------------------------------------------
# 3. Stops and EOS; seeded sampling


def first_hit(matcher: gen.StopMatcher, sequence) -> int | None:
    state = 0
    for i, t in enumerate(sequence):
        if matcher.hit[state, t]:
            return i
        state = matcher.next_state[state, t]
    return None


def test_stop_string_matcher_finds_the_text_however_it_is_split(world):
    tokenizer, _ = world
    vocab = len(tokenizer)
    matcher = gen.stop_on_strings(tokenizer, ["###"], vocab)
    pieces = {p: tokenizer.convert_tokens_to_ids(p) for p in ("#", "##", "▁##", "▁###", "▁red",
                                                             "<0x23>", "<0x0A>", tokens.VI_END)}
    ids = lambda *ps: [pieces[p] for p in ps]  # noqa: E731
    assert first_hit(matcher, ids("▁red", "##", "#", "▁red")) == 2  # "red###"
    assert first_hit(matcher, ids("▁###")) == 0
    assert first_hit(matcher, ids("#", "<0x23>", "▁red", "<0x23>")) is None  # "## red#"
    assert first_hit(matcher, ids("#", "<0x23>", "<0x23>")) == 2  # the byte piece of '#'
    assert first_hit(matcher, ids("##", "▁##")) is None  # "## ##": the space breaks it
    assert first_hit(matcher, ids("##", "▁##", "#")) == 2  # "## ###"
    assert first_hit(matcher, ids("##", "<0x0A>", "#", "▁##")) is None
    # A special token adds no text: "#" <vi_end> "##" decodes to "###".
    assert first_hit(matcher, ids("#", tokens.VI_END, "##")) == 2

    # Against the decoded text, over random sequences of '#'-heavy pieces.
    rng = np.random.default_rng(0)
    pool = list(pieces.values()) + [tokenizer.convert_tokens_to_ids("▁the")]
    for _ in range(300):
        seq = rng.choice(pool, size=8).tolist()
        want = next((i for i in range(8) if "###" in tokenizer.decode(
            seq[:i + 1], skip_special_tokens=True)), None)
        assert first_hit(matcher, seq) == want, tokenizer.convert_ids_to_tokens(seq)


def test_stop_token_sequences_match_as_suffixes_and_combine():
    patterns = ([5, 6], [6, 7, 8], [9])
    matcher = gen.stop_on_token_sequences(patterns, vocab_size=12)
    # Two matchers in one automaton (as `generate` runs them): a hit of either.
    combined = gen.combine([gen.stop_on_token_sequences(patterns[:2], 12),
                            gen.stop_on_token_sequences(patterns[2:], 12)], 12)
    assert combined.next_state.shape == (16, 12)  # 6 x 2 states, padded to a power of two
    rng = np.random.default_rng(1)
    for _ in range(300):
        seq = rng.integers(4, 11, size=10).tolist()
        want = next((i for i in range(10)
                     if any(seq[:i + 1][-len(s):] == s for s in patterns)), None)
        assert first_hit(matcher, seq) == first_hit(combined, seq) == want, seq


def test_stop_string_and_eos_end_a_row_where_the_text_says(world):
    tokenizer, model = world
    prompt = encode(tokenizer, "Which colour is the square?", NUM_FRAMES)
    frames, frame_mask = random_frames(NUM_FRAMES, 4)[None], np.ones((1, NUM_FRAMES), bool)
    sampling = gen.SamplingConfig(max_new_tokens=24)
    free = gen.generate(model, [prompt], frames, frame_mask, sampling=sampling)[0]
    pieces = [tokenizer.decode(free[:i], skip_special_tokens=True) for i in range(25)]
    text = pieces[-1]
    # A stop string of 3 characters that straddles a token boundary, first seen after token k.
    k = next(i for i in range(6, 24) if len(pieces[i]) - len(pieces[i - 1]) == 1
             and len(pieces[i - 1]) > 2 and pieces[i - 1][-2:] + pieces[i][-1] not in pieces[i - 1])
    stop = pieces[k][-3:]
    assert stop not in pieces[k - 1] and len(stop) == 3
    for run in (gen.generate, streamed):
        out = run(model, [prompt], frames, frame_mask, sampling=sampling,
                  stop_matchers=[gen.stop_on_strings(tokenizer, [stop], len(tokenizer))])[0]
        assert out == free[:k]  # up to and with the token that completes the stop string
        cut = gen.cut_at_stop(tokenizer.decode(out, skip_special_tokens=True), stop)
        assert cut == text.split(stop)[0].strip()
        # EOS ends the row and is not part of it.
        j = next(i for i in range(3, 24) if free[i] not in free[:i])
        assert run(model, [prompt], frames, frame_mask, sampling=sampling,
                   eos_id=free[j])[0] == free[:j]
        # A stop given as token ids (as valley_jax.qa does) ends the row with those ids.
        assert run(model, [prompt], frames, frame_mask, sampling=sampling,
                   stop_sequences=[free[j - 2:j]])[0] == free[:j]

    assert gen.cut_at_stop(" Assistant: red square\n### Human: next") == "red square"
    assert gen.cut_at_stop(" left\n###") == "left"


def test_sampling_repeats_with_a_seed(world):
    tokenizer, model = world
    prompt = encode(tokenizer, "Which colour is the square?", NUM_FRAMES)
    frames, frame_mask = random_frames(NUM_FRAMES, 4)[None], np.ones((1, NUM_FRAMES), bool)
    run = lambda **kw: gen.generate(model, [prompt], frames, frame_mask,  # noqa: E731
                                    sampling=gen.SamplingConfig(max_new_tokens=24, **kw))[0]
    first = run(temperature=1.0, seed=3)
    assert run(temperature=1.0, seed=3) == first
    assert run(temperature=1.0, seed=4) != first
    assert streamed(model, [prompt], frames, frame_mask, sampling=gen.SamplingConfig(
        max_new_tokens=24, temperature=1.0, seed=3)) == [first]
    assert run(temperature=1.0, top_k=3, top_p=0.9, seed=3) != first
    assert run(temperature=0.7, top_k=1, seed=5) == run() != first  # top-1 sampling is greedy


def test_top_k_and_top_p_keep_the_right_tokens():
    logits = jnp.log(jnp.asarray([[0.1, 0.4, 0.2, 0.3]], jnp.float32))  # order 1, 3, 2, 0
    keys = jax.random.split(jax.random.key(0), 400)

    def seen(**kw):
        knobs = dict(temperature=jnp.float32(kw.get("temperature", 1.0)),
                     top_k=jnp.int32(kw.get("top_k", 0)), top_p=jnp.float32(kw.get("top_p", 1.0)))
        draw = jax.vmap(lambda k: gen.sample_logits(logits, k, greedy=False, **knobs))(keys)
        return set(np.asarray(draw).ravel().tolist())

    assert seen() == {0, 1, 2, 3}
    assert seen(top_k=2) == {1, 3}
    assert seen(top_k=3) == {1, 2, 3}
    assert seen(top_p=0.5) == {1, 3}  # 0.4 < 0.5, then 0.4 + 0.3 reaches it
    assert seen(top_p=0.4) == {1}
    assert seen(top_p=0.85) == {1, 2, 3}  # 0.9 before the last: it is dropped
    assert seen(top_k=3, top_p=0.75) == {1, 3}  # top-p over the renormalised top-3 (0.44, 0.33)
    assert seen(temperature=1e-3) == {1}


# ---------------------------------------------------------------------------------------------
# Compilation: a chat session compiles once per bucket


def test_one_compilation_per_bucket(world):
    tokenizer, model = world
    prefill_before, step_before = gen._prefill._cache_size(), gen._step._cache_size()
    for texts, max_new, temperature in ((("the", "one"), 8, 0.5),
                                        (("the square moves left" * 3, "red"), 20, 0.9),
                                        (("one two", "three"), 30, 0.7)):
        prompts = [encode(tokenizer, text) for text in texts]
        assert {gen.bucket(len(p)) for p in prompts} == {64} and gen.bucket(64 + max_new) == 128
        streamed(model, prompts, sampling=gen.SamplingConfig(
            max_new_tokens=max_new, temperature=temperature, top_p=temperature))
    # Prompts of three lengths, three lengths of answer, three temperatures: one prefill and
    # one step compiled (batches of two are run nowhere else in this file).
    assert gen._prefill._cache_size() - prefill_before == 1
    assert gen._step._cache_size() - step_before == 1
