"""Shared pytest set-up: CPU-only determinism and quieter third-party warnings."""
import os

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("OMP_NUM_THREADS", "2")
