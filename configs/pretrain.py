"""Stage 1 (alignment): train the projector and the new token embeddings; ViT and LLM frozen.

    python -m valley_jax.train --config=configs/pretrain.py:demo --workdir=DIR
    python -m valley_jax.train --config=configs/pretrain.py:7b --workdir=DIR \
        --config.init.vision=CLIP_DIR --config.init.llm=VICUNA_DIR --config.data.train=...

Variants: demo (CPU, synthetic data; its random ViT is first pretrained to tag frames, a stand-in
for CLIP: valley_jax/vision_pretrain.py), 7b, 13b (the reference recipe: lr 2e-3, warm-up 3 %,
cosine, batch 16 x 8, one epoch of LLaVA-CC3M-595K + WebVid-703K, AdamW b=(0.9, 0.95), wd 0).
"""

from valley_jax import run_config


def get_config(arg: str = "7b"):
    c = run_config.base("pretrain")
    c.optim.lr, c.optim.b2, c.optim.weight_decay = 2e-3, 0.95, 0.0
    c.batch_size = 128
    c.data.max_length = 2048
    # 595K + 703K samples, one epoch at a global batch of 128.
    c.total_steps = (595_375 + 703_000) // 128
    c.eval_every = c.checkpoint_every = 1000
    if arg == "demo":
        run_config.demo(c)
        c.total_steps = 60
        c.optim.lr = 2e-3
        c.checkpoint_every = 30
        c.eval_every = 60  # held-out loss at the end only (its compilation and batches: seconds)
        # The stand-in for CLIP (which cannot be downloaded here): the random ViT first learns to
        # tag frames with their captions' colour-shape pairs, through its class token and the
        # mean of its patch tokens where each colour is, and through each patch token which
        # shape it is part of (valley_jax/vision_pretrain.py; ~2.5 min). Direction answers at
        # seed 0: 0.27-0.79 without the layout, 0.69-0.91 with it in the class token, 0.90 with
        # it in the patch tokens too. Shape answers at seed 0: 0.60 without the patch shapes,
        # 0.84-0.87 with them, 0.98 once the pretraining's peak lr went 1e-3 -> 2e-3
        # (init.vision_pretrain_lr; BENCHMARKS.md, "CPU demo").
        c.init.vision_pretrain_steps = 2500
        # And through each patch token which colour covers it, so that a question naming a shape
        # can read that shape's colour off its patches. Colour weight 0 / 0.1 / 0.2 / 0.3: at
        # seed 2 colour answers 0.67 / 0.78 / 0.81 / 0.90, shape 0.83 / 0.87 / 0.92 / 0.98; at
        # seed 0 direction 0.95 / 0.89 / 0.94 / 0.79 (BENCHMARKS.md, "CPU demo", session 20).
        c.init.vision_pretrain_colour_weight = 0.2
        c.data.train = [dict(path="{data}/stage1.json", video_root="{data}", image_root="{data}")]
        c.data.val = [dict(path="{data}/val.json", video_root="{data}", image_root="{data}")]
    elif arg in ("7b", "13b"):
        c.model.preset = arg
        c.mesh.data, c.mesh.fsdp = 1, -1
        if arg == "13b":
            # 32 rows per chip on a v5p-8 need 98.5 GiB of its 95 GiB; two micro-batches of 16
            # need 59 (docs/scaling.md, measured with python -m valley_jax.aot).
            c.micro_batches = 2
    else:
        raise ValueError(f"unknown variant {arg!r}: demo, 7b or 13b")
    return c
