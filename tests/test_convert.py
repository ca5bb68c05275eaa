"""Weight conversion (valley_jax.convert): Hugging Face and the authors' Valley checkpoints in,
Hugging Face out. Tiny random models are built here; every check is an exact value or a logits
tolerance against the PyTorch assembly."""

import functools
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import torch
from flax import nnx
from safetensors.numpy import load_file
from safetensors.torch import save_file as save_torch_file
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import AutoModelForCausalLM, AutoTokenizer, CLIPVisionModel, PreTrainedTokenizerFast

import torch_reference as ref
from valley_jax import checkpoint, convert, hf, tokens

# ---------------------------------------------------------------------------------------------
# Builders


def save_tokenizer(folder, size: int, named: dict | None = None):
    """A word-level tokenizer of `size` entries: <unk>, <s>, </s>, filler words, and the tokens
    of `named` ({token: id}) at the ids given."""
    named = named or {}
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **named}
    free = (i for i in range(size) if i not in vocab.values())
    while len(vocab) < size:
        i = next(free)
        vocab[f"w{i}"] = i
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>")
    if named:
        fast.add_special_tokens({"additional_special_tokens": list(named)})
    fast.save_pretrained(folder)
    return fast


def read_folder(folder) -> dict:
    """Every tensor of a safetensors folder (sharded or not), by name."""
    out = {}
    for name in sorted(os.listdir(folder)):
        if name.endswith(".safetensors"):
            out.update(load_file(os.path.join(folder, name)))
    return out


def assert_bitwise(a: np.ndarray, b: np.ndarray, name: str):
    assert a.dtype == b.dtype and a.shape == b.shape, (name, a.dtype, b.dtype, a.shape, b.shape)
    assert a.tobytes() == b.tobytes(), name


# The authors' checkpoints hold a ViT whose heads are 64 wide (the head count is read off the
# width), so their tiny stand-in is 128 wide with 2 heads.
WIDE_CLIP = dict(hidden_size=128, num_attention_heads=2, intermediate_size=256)
MEDIA_TOKENS = {tokens.IM_PATCH: ref.IM_PATCH_ID, tokens.VI_FRAME: ref.VI_FRAME_ID,
                tokens.IM_START: ref.IM_START_ID, tokens.IM_END: ref.IM_END_ID,
                tokens.VI_START: ref.VI_START_ID, tokens.VI_END: ref.VI_END_ID}


@functools.lru_cache(maxsize=None)
def reference_model(kind: str, seed: int = 0) -> ref.ValleyReference:
    clip, llama = ref.tiny_clip(seed, **WIDE_CLIP), ref.tiny_llama(seed + 1)
    return ref.ValleyReference(clip, llama, ref.TemporalReference(kind, 16, 64, seed + 2))


def authors_config(model: ref.ValleyReference, kind: str, **overrides) -> dict:
    """config.json as the authors' code writes it (transformers 4.28 LlamaConfig + mm_*)."""
    c = model.llama.config
    d = dict(architectures=["ValleyLlamaForCausalLM"], model_type="valley",
             hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
             num_attention_heads=c.num_attention_heads, num_hidden_layers=c.num_hidden_layers,
             num_key_value_heads=c.num_key_value_heads, rms_norm_eps=c.rms_norm_eps,
             max_position_embeddings=c.max_position_embeddings, hidden_act="silu",
             vocab_size=100,  # stale on purpose: the vocabulary comes from the tensors
             torch_dtype="float32", mm_vision_tower="openai/clip-vit-large-patch14",
             mm_hidden_size=model.clip.config.hidden_size, mm_vision_select_layer=-2,
             mm_use_im_start_end=True, use_mm_proj=True,
             use_patch_importance_pooling=kind == "importance",
             use_delta_transformer=kind == "transformer")
    d.update(overrides)
    return d


def dead_extras(model: ref.ValleyReference, kind: str) -> dict:
    """What older releases also carry: rotary buffers and, for v3, the dead duplicate layer
    (its own random values, never run)."""
    out = {f"model.layers.{i}.self_attn.rotary_emb.inv_freq": torch.rand(8)
           for i in range(model.llama.config.num_hidden_layers)}
    if kind == "transformer":
        torch.manual_seed(99)
        dead = torch.nn.TransformerEncoderLayer(64, 8, batch_first=True)
        out.update({hf.DEAD_DUPLICATE_PREFIX + k: v.detach().clone()
                    for k, v in dead.state_dict().items()})
    return out


def write_tensors(folder, sd: dict, fmt: str, shards: int = 1):
    """The state dict as `model*.safetensors` or `pytorch_model*.bin`, with an index if sharded."""
    os.makedirs(folder, exist_ok=True)
    names = sorted(sd)
    parts = [names[i::shards] for i in range(shards)]
    ext, stem = ("safetensors", "model") if fmt == "safetensors" else ("bin", "pytorch_model")
    files = ([f"{stem}.{ext}"] if shards == 1 else
             [f"{stem}-{i + 1:05d}-of-{shards:05d}.{ext}" for i in range(shards)])
    for part, file in zip(parts, files):
        tensors = {k: sd[k].contiguous() for k in part}
        if fmt == "safetensors":
            save_torch_file(tensors, os.path.join(folder, file), metadata={"format": "pt"})
        else:
            torch.save(tensors, os.path.join(folder, file))
    if shards > 1:
        index = {"metadata": {}, "weight_map": {k: f for part, f in zip(parts, files) for k in part}}
        with open(os.path.join(folder, f"{stem}.{ext}.index.json"), "w") as f:
            json.dump(index, f)


def authors_checkpoint(folder, kind, *, fmt="safetensors", shards=1, extras=False,
                       tokenizer=True, config=None, sd=None):
    """A released-style ValleyLlamaForCausalLM folder of the reference model; returns its
    tensors."""
    model = reference_model(kind)
    sd = dict(sd if sd is not None else model.valley_state_dict())
    if extras:
        sd.update(dead_extras(model, kind))
    write_tensors(folder, sd, fmt, shards)
    meta = config or authors_config(model, kind)
    if tokenizer:
        save_tokenizer(folder, model.llama.config.vocab_size, MEDIA_TOKENS)
    else:  # no tokenizer: the ids come from the fields the reference sets
        meta = {**meta, "im_patch_token": ref.IM_PATCH_ID, "vi_frame_token": ref.VI_FRAME_ID}
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(meta, f)
    return sd


def to_numpy(sd: dict) -> dict:
    return {k: v.numpy() for k, v in sd.items()}


def media_batch(num_patches=16, num_frames=8, seq_len=90, seed=0):
    """[video of 8 frames, image, text only], right padded, as the data pipeline lays it out."""
    rng = np.random.default_rng(seed)
    rows = [[1, 5] + ref.media_ids(num_patches, num_frames) + list(rng.integers(3, 100, 20)),
            [1, 7] + ref.media_ids(num_patches, 1) + list(rng.integers(3, 100, 12)),
            [1] + list(rng.integers(3, 100, 40))]
    ids, mask = np.zeros((3, seq_len), np.int32), np.zeros((3, seq_len), np.int32)
    for i, r in enumerate(rows):
        ids[i, :len(r)], mask[i, :len(r)] = r, 1
    frames = rng.integers(0, 256, (3, num_frames, 56, 56, 3), dtype=np.uint8)
    frame_mask = np.zeros((3, num_frames), bool)
    frame_mask[0], frame_mask[1, 0] = True, True
    return ids, mask, frames, frame_mask


def reference_logits(kind, ids, mask, frames):
    pixels = [ref.normalise(frames[0]), ref.normalise(frames[1, :1]), None]
    return reference_model(kind)(torch.from_numpy(ids).long(), pixels,
                                 torch.from_numpy(mask)).numpy()


@nnx.jit
def forward(model, ids, frames, frame_mask, mask):
    return model(ids, frames, frame_mask, mask)[0]


# ---------------------------------------------------------------------------------------------
# 1 + 3. The authors' layout: logits equal the PyTorch assembly; valley format round trips


@pytest.mark.parametrize("kind,fmt,shards,extras,tokenizer", [
    ("mean", "bin", 1, True, False),
    ("mean", "safetensors", 2, False, True),
    ("importance", "safetensors", 1, True, True),
    ("importance", "bin", 2, False, False),
    ("transformer", "bin", 2, True, True),
    ("transformer", "safetensors", 1, False, False),
])
def test_authors_checkpoint_gives_reference_logits(tmp_path, kind, fmt, shards, extras,
                                                   tokenizer):
    authors_checkpoint(tmp_path / "valley", kind, fmt=fmt, shards=shards, extras=extras,
                       tokenizer=tokenizer)
    assert convert.main(["from-valley", "--model", str(tmp_path / "valley"),
                         "--out", str(tmp_path / "ckpt")]) == 0

    cfg = checkpoint.load_config(tmp_path / "ckpt")
    assert cfg.temporal == kind
    assert cfg.llm.vocab_size == 120  # from the embedding, not config.json's stale 100
    assert (cfg.im_patch_id, cfg.vi_frame_id) == (ref.IM_PATCH_ID, ref.VI_FRAME_ID)
    assert (cfg.vision.width, cfg.vision.depth, cfg.vision.heads, cfg.vision.mlp_dim,
            cfg.vision.image_size, cfg.vision.patch_size, cfg.vision.select_layer) == (
        128, 3, 2, 256, 56, 14, -2)
    assert (checkpoint.tokenizer_dir(tmp_path / "ckpt") is not None) == tokenizer

    ids, mask, frames, frame_mask = media_batch()
    model = checkpoint.load_model(tmp_path / "ckpt")
    got = np.asarray(forward(model, ids, frames, frame_mask, mask))
    want = reference_logits(kind, ids, mask, frames)
    valid = mask.astype(bool)
    assert np.max(np.abs(got[valid] - want[valid])) < 1e-4


@pytest.mark.parametrize("kind,extras", [("mean", True), ("importance", False),
                                         ("transformer", True)])
def test_valley_format_round_trip_is_bitwise(tmp_path, kind, extras):
    source = authors_checkpoint(tmp_path / "valley", kind, extras=extras)
    convert.from_valley(tmp_path / "valley", tmp_path / "ckpt")
    # A shard limit far below the model size: several shards and an index.
    convert.to_hf(tmp_path / "ckpt", tmp_path / "out", fmt="valley", max_shard_bytes=100_000)

    files = os.listdir(tmp_path / "out")
    assert "model.safetensors.index.json" in files
    assert sum(f.endswith(".safetensors") for f in files) > 2
    written = read_folder(tmp_path / "out")
    live = {k: v for k, v in to_numpy(source).items() if not hf.is_ignored(k)}
    dead = {hf.DEAD_DUPLICATE_PREFIX + k[len(hf.DELTA_ENCODER_PREFIX):]
            for k in live if k.startswith(hf.DELTA_ENCODER_PREFIX)}
    assert set(written) == set(live) | dead
    for name, value in live.items():
        assert_bitwise(written[name], value, name)
    for name in dead:  # the dead duplicate carries the live layer's weights
        live_name = hf.DELTA_ENCODER_PREFIX + name[len(hf.DEAD_DUPLICATE_PREFIX):]
        assert_bitwise(written[name], live[live_name], name)

    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["architectures"] == ["ValleyLlamaForCausalLM"]
    assert config["model_type"] == "valley"
    assert config["mm_vision_tower"] == "openai/clip-vit-large-patch14"  # kept from the source
    assert (config["mm_hidden_size"], config["mm_vision_select_layer"]) == (128, -2)
    assert config["mm_use_im_start_end"] is True and config["use_mm_proj"] is True
    assert config["use_patch_importance_pooling"] == (kind == "importance")
    assert config["use_delta_transformer"] == (kind == "transformer")
    assert (config["vocab_size"], config["hidden_size"], config["num_hidden_layers"]) == (
        120, 64, 2)
    tok = AutoTokenizer.from_pretrained(tmp_path / "out")
    assert tok.convert_tokens_to_ids(tokens.IM_PATCH) == ref.IM_PATCH_ID

    # What we wrote reads back to the same checkpoint state.
    convert.from_valley(tmp_path / "out", tmp_path / "again")
    _, first = checkpoint.load_state(tmp_path / "ckpt")
    _, second = checkpoint.load_state(tmp_path / "again")
    assert first.keys() == second.keys()
    for p in first:
        assert_bitwise(second[p], first[p], ".".join(p))


def test_bfloat16_checkpoint_keeps_its_bits(tmp_path):
    sd = {k: v.to(torch.bfloat16) for k, v in reference_model("mean").valley_state_dict().items()}
    authors_checkpoint(tmp_path / "valley", "mean", fmt="bin", sd=sd)
    convert.from_valley(tmp_path / "valley", tmp_path / "ckpt")
    _, flat = checkpoint.load_state(tmp_path / "ckpt")
    assert flat[("llm", "embed")].dtype == ml_dtypes.bfloat16
    convert.to_hf(tmp_path / "ckpt", tmp_path / "out", fmt="valley")
    written = read_folder(tmp_path / "out")
    for name, value in sd.items():
        want = value.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
        assert_bitwise(written[name], want, name)


# ---------------------------------------------------------------------------------------------
# 1 + 2. Hugging Face CLIP + LLaMA in, Hugging Face out; generation equals transformers


@pytest.fixture(scope="module")
def hf_models(tmp_path_factory):
    """A CLIPVisionModel folder, a LlamaForCausalLM folder with a 120-token tokenizer, their
    from-hf checkpoint and its `llama` export."""
    root = tmp_path_factory.mktemp("hf")
    clip, llama = ref.tiny_clip(3), ref.tiny_llama(4)
    clip.save_pretrained(root / "clip")
    llama.save_pretrained(root / "llama")
    save_tokenizer(root / "llama", 120)
    assert convert.main(["from-hf", "--vision", str(root / "clip"), "--llm", str(root / "llama"),
                         "--out", str(root / "ckpt"), "--temporal", "transformer"]) == 0
    assert convert.main(["to-hf", "--checkpoint", str(root / "ckpt"), "--out", str(root / "out"),
                         "--format", "llama"]) == 0
    return root


def test_from_hf_adds_tokens_and_grows_vocab(hf_models):
    cfg = checkpoint.load_config(hf_models / "ckpt")
    # [PAD] 120, <vi_frame> 121, <vi_start> 122, <vi_end> 123, <im_patch> 124, ...
    assert (cfg.llm.vocab_size, cfg.vi_frame_id, cfg.im_patch_id) == (127, 121, 124)
    assert (cfg.temporal, cfg.num_frames, cfg.vision.select_layer) == ("transformer", 8, -2)
    tok = AutoTokenizer.from_pretrained(checkpoint.tokenizer_dir(hf_models / "ckpt"))
    assert len(tok) == 127 and tok.pad_token == tokens.PAD
    assert tok.convert_tokens_to_ids(tokens.IM_END) == 126

    _, flat = checkpoint.load_state(hf_models / "ckpt")
    # The fresh v3 position table is the sinusoid.
    from valley_jax.temporal import sinusoid_table
    assert_bitwise(flat[("temporal", "position")], sinusoid_table(2048, 64), "position")
    assert flat[("projector", "linear", "kernel")].shape == (32, 64)


def test_llama_export_round_trips_bitwise(hf_models):
    source_llm = read_folder(hf_models / "llama")
    source_clip = read_folder(hf_models / "clip")
    llm = read_folder(hf_models / "out" / "llm")
    vision = read_folder(hf_models / "out" / "vision")

    assert set(llm) == set(source_llm)
    for name, value in source_llm.items():
        if name in (convert.EMBED, convert.LM_HEAD):
            # Old rows as they were; the 7 new rows at the float64 mean of the old rows.
            assert_bitwise(llm[name][:120], value, name)
            mean = value.mean(axis=0, dtype=np.float64).astype(np.float32)
            assert_bitwise(llm[name][120:], np.tile(mean, (7, 1)), name)
        else:
            assert_bitwise(llm[name], value, name)
    assert set(vision) == {"vision_model." + k for k in source_clip}
    for name, value in source_clip.items():
        assert_bitwise(vision["vision_model." + name], value, name)

    # The export (with Valley's tokens) converted again is bitwise the same, every tensor.
    out = hf_models / "out"
    convert.from_hf(out / "vision", out / "llm", hf_models / "ckpt2", temporal="transformer")
    convert.to_hf(hf_models / "ckpt2", hf_models / "out2", fmt="llama")
    for sub in ("llm", "vision"):
        first, second = read_folder(out / sub), read_folder(hf_models / "out2" / sub)
        assert first.keys() == second.keys()
        for name in first:
            assert_bitwise(second[name], first[name], name)
    assert checkpoint.load_config(hf_models / "ckpt2").llm.vocab_size == 127

    # Projector and temporal module, under the authors' names.
    mm = load_file(out / "mm_projector.safetensors")
    assert mm["model.mm_projector.weight"].shape == (64, 32)
    assert mm["model.transformer_delta_encoder.layers.0.self_attn.in_proj_weight"].shape == (192, 64)
    assert json.loads((out / "valley.json").read_text())["model"]["temporal"] == "transformer"


def test_llama_export_loads_in_transformers_and_generates_the_same(hf_models):
    out = hf_models / "out"
    torch_llm, info = AutoModelForCausalLM.from_pretrained(out / "llm", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    clip, info = CLIPVisionModel.from_pretrained(out / "vision", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]

    model = checkpoint.load_model(hf_models / "ckpt")
    pixels = torch.randn(2, 3, 56, 56)
    with torch.no_grad():
        want = clip(pixel_values=pixels, output_hidden_states=True).hidden_states[-2].numpy()
    got = np.asarray(model.vision(jnp.asarray(pixels.permute(0, 2, 3, 1).numpy())))
    assert np.max(np.abs(got - want)) < 1e-4
    graphdef, state = nnx.split(model)

    @jax.jit
    def run(state, ids, positions, cache):
        return nnx.merge(graphdef, state)(ids, positions=positions, cache=cache)

    tok = AutoTokenizer.from_pretrained(out / "llm")
    for prompt in ("<s> w7 w19 w3 w88 w41", "<s> w100 w5 <vi_end> w12 w12 w60 w9 w33 w71"):
        ids = tok(prompt).input_ids
        with torch.no_grad():
            want = torch_llm.generate(torch.tensor([ids]), max_new_tokens=20,
                                      do_sample=False)[0, len(ids):].tolist()
        assert len(want) == 20  # no end-of-sequence on the way
        # valley_jax: prefill, then one token at a time through the KV cache; greedy.
        cache = model.llm.init_cache(batch=1, max_len=32)
        logits, cache = run(state, jnp.asarray([ids]), jnp.arange(len(ids))[None], cache)
        got = []
        for i in range(20):
            token = int(jnp.argmax(logits[0, -1]))
            got.append(token)
            logits, cache = run(state, jnp.asarray([[token]]), jnp.asarray([[len(ids) + i]]),
                                cache)
        assert got == want, prompt
        assert len(set(got)) > 3  # a real sequence, not one token repeated


def test_to_hf_reads_a_checkpoint_saved_from_a_model(hf_models, tmp_path):
    """The trainer's export goes through checkpoint.save_model (device arrays, orbax's defaults):
    to-hf reads that too, to the same bits."""
    model = checkpoint.load_model(hf_models / "ckpt")
    checkpoint.save_model(tmp_path / "trained", model,
                          checkpoint.tokenizer_dir(hf_models / "ckpt"))
    convert.to_hf(tmp_path / "trained", tmp_path / "out", fmt="llama")
    for sub in ("llm", "vision"):
        first, second = read_folder(hf_models / "out" / sub), read_folder(tmp_path / "out" / sub)
        assert first.keys() == second.keys()
        for name in first:
            assert_bitwise(second[name], first[name], name)


def test_trainer_checkpoint_tokenizer_gets_valley_tokens(hf_models, tmp_path):
    """The trainer saves its model with the plain data tokenizer folder (no Valley tokens):
    the checkpoint's tokenizer must hold them at the model's ids, and its `valley` export must
    load back with from-valley."""
    model = checkpoint.load_model(hf_models / "ckpt")
    checkpoint.save_model(tmp_path / "trained", model, hf_models / "llama")  # 120 tokens, plain
    tok = AutoTokenizer.from_pretrained(checkpoint.tokenizer_dir(tmp_path / "trained"))
    assert len(tok) == 127
    assert tok.convert_tokens_to_ids(tokens.IM_PATCH) == model.cfg.im_patch_id == 124
    assert tok.convert_tokens_to_ids(tokens.VI_FRAME) == model.cfg.vi_frame_id == 121
    assert "config.json" not in os.listdir(checkpoint.tokenizer_dir(tmp_path / "trained"))
    assert convert.main(["to-hf", "--checkpoint", str(tmp_path / "trained"),
                         "--out", str(tmp_path / "valley"), "--format", "valley"]) == 0
    assert convert.main(["from-valley", "--model", str(tmp_path / "valley"),
                         "--out", str(tmp_path / "back")]) == 0
    assert checkpoint.load_config(tmp_path / "back") == model.cfg


def test_to_hf_merges_lora_adapters(hf_models, tmp_path):
    """A stage-2 LoRA checkpoint is published with its adapters folded into the kernels."""
    import dataclasses
    from valley_jax.config import LoraConfig
    cfg, flat = checkpoint.load_state(hf_models / "ckpt")
    adapters = LoraConfig(rank=2, alpha=4.0, targets=("q", "down"))
    cfg = dataclasses.replace(cfg, llm=dataclasses.replace(cfg.llm, lora=adapters))
    rng = np.random.default_rng(0)
    for name in ("q", "down"):
        layers, fan_in, *out_shape = flat[("llm", "layers", name, "kernel")].shape
        shapes = {"lora_a": (layers, fan_in, 2), "lora_b": (layers, 2, *out_shape)}
        for part, shape in shapes.items():
            flat[("llm", "layers", name, part)] = rng.standard_normal(shape).astype(np.float32)
    checkpoint.save_state(tmp_path / "lora", cfg, flat)
    convert.to_hf(tmp_path / "lora", tmp_path / "out", fmt="llama")

    merged = read_folder(tmp_path / "out" / "llm")
    plain = read_folder(hf_models / "out" / "llm")
    for layer in range(2):
        for name, hf_name, out_dim in (("q", "self_attn.q_proj", 64), ("down", "mlp.down_proj", 64)):
            a = flat[("llm", "layers", name, "lora_a")][layer]
            b = flat[("llm", "layers", name, "lora_b")][layer].reshape(2, out_dim)
            key = f"model.layers.{layer}.{hf_name}.weight"
            # kernel' = kernel + a @ b * alpha / rank; torch's weight is the kernel transposed.
            np.testing.assert_allclose(merged[key], plain[key] + (a @ b * 2.0).T, atol=1e-5)
    assert_bitwise(merged["model.layers.0.self_attn.k_proj.weight"],
                   plain["model.layers.0.self_attn.k_proj.weight"], "k_proj")


def test_from_hf_reads_a_full_clip_model_and_sharded_bin_llama(tmp_path):
    """A CLIPModel folder (vision + text) and a LLaMA as sharded .bin with an index."""
    from transformers import CLIPConfig, CLIPModel
    text = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64,
                vocab_size=50, bos_token_id=0, eos_token_id=1)
    torch.manual_seed(0)
    clip = CLIPModel(CLIPConfig(vision_config=ref.VISION_KW, text_config=text, projection_dim=16))
    clip.save_pretrained(tmp_path / "clip")
    llama = ref.tiny_llama(5)
    llama.config.save_pretrained(tmp_path / "llama")
    write_tensors(tmp_path / "llama", llama.state_dict(), "bin", shards=3)
    save_tokenizer(tmp_path / "llama", 110)  # a tokenizer smaller than the embedding

    convert.from_hf(tmp_path / "clip", tmp_path / "llama", tmp_path / "ckpt", dtype="bfloat16")
    cfg, flat = checkpoint.load_state(tmp_path / "ckpt")
    # Tokens 110..116 reuse rows of the 120-row table, which keeps its size.
    assert (cfg.llm.vocab_size, cfg.im_patch_id) == (120, 114)
    assert all(v.dtype == ml_dtypes.bfloat16 for v in flat.values())
    embed = llama.state_dict()["model.embed_tokens.weight"].numpy()
    mean = embed[:110].mean(axis=0, dtype=np.float64).astype(np.float32)
    expect = embed.copy()
    expect[110:117] = mean
    assert_bitwise(flat[("llm", "embed")], expect.astype(ml_dtypes.bfloat16), "embed")
    want = clip.state_dict()["vision_model.embeddings.patch_embedding.weight"].numpy()
    assert_bitwise(flat[("vision", "patch_embed")],
                   want.transpose(2, 3, 1, 0).astype(ml_dtypes.bfloat16), "patch_embed")


# ---------------------------------------------------------------------------------------------
# 4. Delta releases


def write_llama_folder(folder, sd: dict):
    os.makedirs(folder, exist_ok=True)
    write_tensors(folder, sd, "safetensors")
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump({"model_type": "llama", "architectures": ["LlamaForCausalLM"]}, f)


def test_delta_is_added_in_the_deltas_dtype(tmp_path):
    f16 = torch.float16
    base = {"model.embed_tokens.weight": torch.tensor([[1.0, 2.0], [3.0, -4.0]], dtype=f16),
            "model.norm.weight": torch.tensor([1.0, 1 + 2.0 ** -11, 0.25], dtype=torch.float32),
            "model.layers.0.self_attn.rotary_emb.inv_freq": torch.ones(2)}
    delta = {"model.embed_tokens.weight": torch.tensor([[0.5, 0.25], [-3.0, 1.0], [7.0, 8.0]],
                                                       dtype=f16),
             "model.norm.weight": torch.tensor([1.0, -0.5, 0.5], dtype=f16),
             "model.mm_projector.bias": torch.tensor([9.0, 10.0], dtype=f16)}
    write_llama_folder(tmp_path / "base", base)
    write_llama_folder(tmp_path / "delta", delta)
    apply = convert.DeltaApplier(hf.TensorReader(tmp_path / "delta"),
                                 hf.TensorReader(tmp_path / "base")).get

    # Rows of the base vocabulary: summed; the row past it (an added token): the delta's.
    np.testing.assert_array_equal(apply("model.embed_tokens.weight"),
                                  np.array([[1.5, 2.25], [0.0, -3.0], [7.0, 8.0]], np.float16))
    # The float32 base is rounded to float16 first, as the authors load both in float16:
    # 1 + 2^-11 rounds to 1.0, so -0.5 + base is 0.5 (in float32 it would be 0.5 + 2^-11,
    # which float16 holds).
    norm = apply("model.norm.weight")
    assert norm.dtype == np.float16
    np.testing.assert_array_equal(norm, np.array([2.0, 0.5, 0.75], np.float16))
    want = delta["model.norm.weight"] + base["model.norm.weight"].to(f16)  # apply_delta.py's op
    np.testing.assert_array_equal(norm, want.numpy())
    # Not in the base (projector, vision tower): as it is.
    np.testing.assert_array_equal(apply("model.mm_projector.bias"), np.array([9, 10], np.float16))

    write_llama_folder(tmp_path / "bad", {"model.norm.weight": torch.ones(4)})
    bad = convert.DeltaApplier(hf.TensorReader(tmp_path / "delta"), hf.TensorReader(tmp_path / "bad"))
    with pytest.raises(convert.ConversionError, match=r"model\.norm\.weight: delta .*delta.*"
                       r"\(3,\) but base .*bad.*\(4,\)"):
        bad.get("model.norm.weight")


def test_from_valley_applies_a_delta_release(tmp_path):
    """Valley-13b-v1 style: delta = target - base for the LLaMA tensors. The base here is the
    target rounded to bfloat16 (stored as float32), so delta + base gives the target exactly."""
    target = reference_model("mean").valley_state_dict()
    llama_keys = set(reference_model("mean").llama.state_dict())
    base = {k: target[k].to(torch.bfloat16).float() for k in llama_keys}
    base["model.embed_tokens.weight"] = base["model.embed_tokens.weight"][:100]  # fewer tokens
    base["lm_head.weight"] = base["lm_head.weight"][:100]
    delta = {}
    for k, v in target.items():
        if k in base:
            v = v.clone()
            v[:len(base[k])] -= base[k]
        delta[k] = v
    write_llama_folder(tmp_path / "base", base)
    authors_checkpoint(tmp_path / "target", "mean", sd=target)
    authors_checkpoint(tmp_path / "delta", "mean", sd=delta)

    assert convert.main(["from-valley", "--model", str(tmp_path / "delta"), "--base",
                         str(tmp_path / "base"), "--out", str(tmp_path / "applied")]) == 0
    convert.from_valley(tmp_path / "target", tmp_path / "direct")
    _, applied = checkpoint.load_state(tmp_path / "applied")
    _, direct = checkpoint.load_state(tmp_path / "direct")
    for p in direct:
        assert_bitwise(applied[p], direct[p], ".".join(p))
    assert checkpoint.load_source(tmp_path / "applied")["base"] == str(tmp_path / "base")


# ---------------------------------------------------------------------------------------------
# 5. Bad input: a clear message naming the file and the tensor, exit status 1, no traceback


def run_cli(capsys, *argv):
    status = convert.main([str(a) for a in argv])
    return status, capsys.readouterr().err


def test_missing_shard(tmp_path, capsys):
    authors_checkpoint(tmp_path / "valley", "mean", shards=2)
    os.remove(tmp_path / "valley" / "model-00002-of-00002.safetensors")
    status, err = run_cli(capsys, "from-valley", "--model", tmp_path / "valley", "--out",
                          tmp_path / "ckpt")
    assert status == 1
    assert err.startswith("error: ") and "model-00002-of-00002.safetensors" in err
    assert "missing" in err and not (tmp_path / "ckpt").exists()


def test_mismatched_shape_names_file_and_tensor(tmp_path, capsys):
    sd = dict(reference_model("mean").valley_state_dict())
    sd["model.layers.1.mlp.up_proj.weight"] = torch.zeros(100, 64)
    authors_checkpoint(tmp_path / "valley", "mean", shards=2, sd=sd)
    status, err = run_cli(capsys, "from-valley", "--model", tmp_path / "valley", "--out",
                          tmp_path / "ckpt")
    index = json.loads((tmp_path / "valley" / "model.safetensors.index.json").read_text())
    shard = index["weight_map"]["model.layers.1.mlp.up_proj.weight"]
    assert status == 1
    assert f"{tmp_path / 'valley' / shard}: model.layers.1.mlp.up_proj.weight: shape (100, 64)" in err
    assert not (tmp_path / "ckpt").exists() and not (tmp_path / "ckpt.partial").exists()


def test_missing_tensor_is_named(tmp_path, capsys):
    sd = dict(reference_model("importance").valley_state_dict())
    del sd["model.norm.weight"]
    authors_checkpoint(tmp_path / "valley", "importance", sd=sd)
    status, err = run_cli(capsys, "from-valley", "--model", tmp_path / "valley", "--out",
                          tmp_path / "ckpt")
    assert status == 1
    assert err == f"error: {tmp_path / 'valley'}: tensors missing from the checkpoint: " \
                  "model.norm.weight\n"


def test_unknown_architectures(tmp_path, capsys):
    model = reference_model("mean")
    qwen = authors_config(model, "mean", architectures=["ValleyQwen2ForCausalLM"])
    authors_checkpoint(tmp_path / "valley2", "mean", config=qwen)
    status, err = run_cli(capsys, "from-valley", "--model", tmp_path / "valley2", "--out",
                          tmp_path / "ckpt")
    assert status == 1
    assert str(tmp_path / "valley2" / "config.json") in err
    assert "ValleyQwen2ForCausalLM" in err and "Valley 2.0" in err

    # A LLaMA folder given as --llm must be a LLaMA.
    ref.tiny_clip().save_pretrained(tmp_path / "clip")
    mistral = tmp_path / "mistral"
    ref.tiny_llama().save_pretrained(mistral)
    meta = json.loads((mistral / "config.json").read_text())
    (mistral / "config.json").write_text(json.dumps({**meta, "model_type": "mistral"}))
    status, err = run_cli(capsys, "from-hf", "--vision", tmp_path / "clip", "--llm", mistral,
                          "--out", tmp_path / "ckpt")
    assert status == 1 and str(mistral / "config.json") in err and "'mistral'" in err


def test_code_running_pickle_is_refused(tmp_path, capsys):
    marker = tmp_path / "pwned"

    class RunsCode:
        def __reduce__(self):
            return os.system, (f"touch {marker}",)

    folder = tmp_path / "valley"
    authors_checkpoint(folder, "mean", fmt="bin")
    torch.save({"model.embed_tokens.weight": RunsCode()}, folder / "pytorch_model.bin")
    status, err = run_cli(capsys, "from-valley", "--model", folder, "--out", tmp_path / "ckpt")
    assert status == 1
    assert f"{folder / 'pytorch_model.bin'}: refused to load with weights_only=True" in err
    assert not marker.exists()


def test_unknown_media_token_ids(tmp_path, capsys):
    folder = tmp_path / "valley"
    authors_checkpoint(folder, "mean", tokenizer=False)
    meta = json.loads((folder / "config.json").read_text())
    del meta["im_patch_token"]
    (folder / "config.json").write_text(json.dumps(meta))
    status, err = run_cli(capsys, "from-valley", "--model", folder, "--out", tmp_path / "ckpt")
    assert status == 1 and str(folder) in err and "im_patch_token" in err


def test_cli_exits_without_traceback(tmp_path):
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "keep.txt").write_text("not mine to delete")
    result = subprocess.run(
        [sys.executable, "-m", "valley_jax.convert", "to-hf", "--checkpoint", str(tmp_path / "nope"),
         "--out", str(tmp_path / "ckpt"), "--format", "llama"],
        capture_output=True, text=True, cwd=os.path.dirname(os.path.dirname(__file__)))
    assert result.returncode == 1
    assert result.stderr.startswith("error: ") and "Traceback" not in result.stderr
    assert (tmp_path / "ckpt" / "keep.txt").exists()
