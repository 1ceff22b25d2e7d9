"""Checkpoint -> bundle: Meta multi-token-prediction reader, GGUF writer,
quantizer, reference forward and verification. Needs torch (the `convert` extra)."""
