"""Fast paths: caches that skip repeated work without changing what is computed.

processed_cache   processed tensors of deterministic splits, kept in memory (eval/test: transforms run once)
decoded_images    images decoded once and stored as uint8 at a bounded size; augmentation runs on the tensors
probe_features    linear probe: the frozen backbone's features computed once, the head trains on them
"""
