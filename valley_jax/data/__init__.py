"""Data: records -> frames + tokens -> batches (and the synthetic video world for the demo)."""
