"""Shared pytest set-up: CPU-only determinism, quieter third-party warnings, and a token of this test session."""
import os
import uuid

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("OMP_NUM_THREADS", "2")
# Inherited by every process the session starts (runs, stage workers, torchrun ranks): helpers that look for
# leftover processes (tests/helpers/driver.py stage_processes_left) count only this session's, so two suites side by
# side, with or without xdist, never see each other's stages.
SESSION_ENV = "MEGATRON_INPO_TEST_SESSION"
# the session's random part is set once (an xdist controller's is inherited by its workers, and a re-import keeps
# it); the worker id keeps xdist workers apart
_base = os.environ.setdefault(SESSION_ENV + "_BASE", uuid.uuid4().hex)
os.environ[SESSION_ENV] = f"{_base}:{os.environ.get('PYTEST_XDIST_WORKER', '')}"
