"""Data: records -> frames + tokens -> batches (and the synthetic video world for the demo).

  config.py      DataConfig, DatasetSpec: the one description of an input pipeline
  records.py     Valley/LLaVA JSON and JSONL reading, media paths under their roots
  frames.py      frame sampling, video resize + crop, CLIP image preprocessing
  text.py        tokenizer with Valley's tokens, template v1, exact label masks
  skips.py       why a record is skipped, and how skips are counted
  transforms.py  the Grain steps (record -> example, drop skipped, pad a batch)
  pipeline.py    Loader (the batches, their state, skip counts) and to_global (onto a mesh)
  prepare.py     `python -m valley_jax.data.prepare`: JSON -> ArrayRecord through tfds

Nothing is imported here: the loader's worker processes import this package, and must not pay
for transformers or tfds imports they do not use.
"""
