"""SGLang servers as a service of the run: the HTTP transport and the servers' life cycle, shared by the rollout
engine (rollout/sglang.py), the judges (judge/pairwise.py, judge/reward.py), the driver and launch/sglang_servers.py.

- pool.py: SGLangPool (retries, back-off, fail-over, concurrency limit) and SGLangError.
- servers.py: start / watch / stop SGLang server processes (ServerLaunchConfig, start_servers, stop_servers).
- memory_plan.py: the --mem-fraction-static of each server on shared GPUs (plan_server_memory).
- memory.py: release / resume of the servers' GPU memory around Megatron stages, recorded across driver restarts
  (ServerMemory, ServerMemoryRecord).
"""
