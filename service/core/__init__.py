"""The serving core every front door shares: the model repository, admission and batching, the
decode/preprocess pipeline, the runtimes, and the metrics. Nothing here knows HTTP."""
