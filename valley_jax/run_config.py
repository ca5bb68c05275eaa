"""The fields of a training run and their defaults, shared by configs/pretrain.py and
configs/finetune.py (which set each stage's recipe and variants). A run is described by its
ConfigDict alone; the trainer saves it in the workdir."""

from __future__ import annotations

import ml_collections


def base(stage: str) -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.stage = stage  # pretrain | finetune | lora
    c.seed = 0
    c.total_steps = 1000
    c.log_every = 10
    c.eval_every = 500
    c.checkpoint_every = 500
    c.keep_checkpoints = 3
    c.batch_size = 128  # global, over all processes
    c.micro_batches = 1  # gradient accumulation inside the step

    c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))

    c.model = ml_collections.ConfigDict(dict(
        preset="7b",  # demo | 7b | 13b (sizes); token ids and vocabulary come from the tokenizer
        temporal="mean",  # mean (v1) | importance (v2) | transformer (v3)
        num_frames=8,
        dtype="bfloat16",  # compute
        param_dtype="float32",  # master weights
        scan_layers=True,
        remat="full",  # none | full | dots | dots_no_batch
        # The decoder's causal attention runs in query blocks of this many rows, each over the
        # keys up to its end only (layers.causal_attention): smaller blocks skip more of the
        # masked half, in more and smaller products.
        attention_block=512,
        train_vision=False,
        # The loss runs the lm_head on at most this many learned tokens per sequence (0: on every
        # position); a batch with a longer answer takes every position, so the loss is the same.
        max_learned_tokens=0,
        lora_rank=16, lora_alpha=32.0, lora_dropout=0.05,  # stage 'lora' only
    ))

    c.optim = ml_collections.ConfigDict(dict(
        lr=2e-3, warmup_ratio=0.03, b1=0.9, b2=0.999, weight_decay=0.0, grad_clip=1.0,
        # With model.train_vision: the ViT's learning rate as a multiple of lr (1: the same).
        vision_lr_scale=1.0))

    c.data = ml_collections.ConfigDict(dict(
        # Each: path (JSON / JSONL / prepared ArrayRecord folder), video_root, image_root, weight.
        # Tuples, so that --config.data.train='[{"path": ...}, ...]' overrides them.
        train=(), val=(),
        tokenizer="",  # default: the tokenizer of init.llm or init.checkpoint
        max_length=2048,
        frame_mode="fixed",  # fixed | fps
        image_size=224, resize_size=256,
        # Training only: videos cropped at a random offset instead of centred (data augmentation;
        # Valley has none, and the demo runs without it: BENCHMARKS.md, "CPU demo"). Evaluation
        # always centre-crops.
        random_crop=False,
        num_workers=2,
        # Decoded video frames each loader process keeps for later epochs (MB; 0: none; not with
        # random_crop): for data that is read many times over and fits (data.frames.FrameCache).
        frame_cache_mb=0,
        val_batches=4,  # held-out loss over this many batches
        synthetic=False,  # generate the synthetic world into WORKDIR/data when absent (demo)
        synthetic_num_train=1500,
    ))

    c.init = ml_collections.ConfigDict(dict(
        vision="",  # Hugging Face CLIP folder (stage 1)
        llm="",  # Hugging Face LLaMA / Vicuna folder (stage 1)
        checkpoint="",  # a valley_jax model checkpoint (a stage-1 workdir's `model/`, or convert's)
        # A random start only (the demo, which cannot download CLIP): first pretrain the ViT for
        # this many steps to tag frames with the colour-shape pairs their captions name
        # (valley_jax/vision_pretrain.py), from the records of `vision_pretrain_data`.
        vision_pretrain_steps=0,
        vision_pretrain_lr=2e-3,  # peak; AdamW, warm-up then cosine, batches of 64 frames
        vision_pretrain_data="{data}/stage1.json",  # media paths relative to its folder
        # Also teach each patch token which palette colour covers it, at this weight of the loss
        # (0: not taught; vision_pretrain.patch_colours).
        vision_pretrain_colour_weight=0.0,
    ))

    # Demo evaluation: answer accuracy per question type by greedy generation on these splits
    # (their first `max_items` questions; 0 = all of them). max_new_tokens must hold the longest
    # reply: the demo's move-order replies take up to 11 tokens and the stop 1 (tests/test_synthetic.py).
    c.eval = ml_collections.ConfigDict(dict(qa=(), max_new_tokens=16, max_items=200, batch_size=32))

    # jax.profiler trace of `num_steps` train steps from `start_step` (after compilation and warm-up),
    # into WORKDIR/profile (TensorBoard's profile plugin, or Perfetto: a .trace.json.gz beside it).
    # 0 steps: no trace.
    c.profile = ml_collections.ConfigDict(dict(start_step=20, num_steps=0))
    return c


def demo(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """The CPU demo: tiny model, synthetic data generated into the workdir, minutes to run."""
    c.model.preset = "demo"
    c.model.dtype = "float32"
    c.model.remat = "none"
    c.model.scan_layers = False  # 2-3 layers: unrolled runs a CPU step ~20% faster than a scan
    # The synthetic clips have 16 frames; 4 sampled ones (0, 5, 10, 15) show every event the
    # questions ask about (a late shape missing then present, each shape at rest then moving) at
    # a quarter less time per step than 8.
    c.model.num_frames = 4
    c.batch_size = 16
    c.mesh.data = -1
    c.data.synthetic = True
    c.data.image_size, c.data.resize_size = 112, 128
    # Every padded token costs (192 made the step ~15% slower). The longest synthetic record
    # (3 turns, 4 frames) is 176 tokens, half are 150 or more: at 168 the trainer keeps the
    # rounds that fit, and a sixth of the QA records (1461 of 9000 in world v5) lose their third.
    c.data.max_length = 168
    # Its 168 rows in three blocks of 56 over 56, 112 and 168 keys: two thirds of the scores of
    # one block; the LLM's attention forward and backward ~25 % faster on 2 cores
    # (BENCHMARKS.md, "CPU demo", session 25).
    c.model.attention_block = 56
    c.data.num_workers = 2
    # The world's ~1500 clips (~200 MB of 4 frames at 112 px) are read about 8 times in stage 2:
    # decoded once, then kept. Decoding was ~4 of a record's 4.5 ms, and the workers decoding
    # beside the step slowed it by a third on 2 cores (BENCHMARKS.md, "CPU demo", session 21).
    c.data.frame_cache_mb = 512
    # A reply is at most 17 tokens (mean ~10 of ~150): the lm_head runs on 24 positions a row.
    c.model.max_learned_tokens = 24
    c.log_every = 10
    # Every question of the held-out splits (369 of `val`, ~62 per type, a few seconds): with the
    # first 200 (~33 per type) one question moved a type's accuracy by 0.03 and runs compared
    # within noise (BENCHMARKS.md, "CPU demo").
    c.eval.max_items = 0
    return c
