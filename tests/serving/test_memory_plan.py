"""GPU memory of the SGLang servers (serving/memory_plan.py, `launch/sglang_servers.py plan`): SGLang's own runtime
reserve (read against the wheel's arg_groups/memory_hook.py), SGLang's KV-cache rule applied in start order to the
8B and 70B recipes' layouts, the fractions the launch scripts used to pass (which leave the judge no KV cache), and
launch/torchrun_inpo.sh starting its servers with the plan's fractions and --enable-deterministic-inference, or
stopping before any server when the plan does not fit."""
import ast
import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_inpo.config import ConfigError
from megatron_inpo.driver.recipes import get_recipe
from megatron_inpo.serving.memory_plan import (GIB, MemoryPlanError, ModelMemory, ServerSlot, llama_param_count,
                                               plan_server_memory, prefill_cuda_graph_sizes, sglang_defaults,
                                               sglang_runtime_reserve_gib)
from tests.helpers.rollout import LLAMA3_8B, LLAMA3_70B, REPO, SGLANG_TEST_DEPS, free_port_pair

FAKE_SERVER = f"{sys.executable} {REPO / 'tests' / 'helpers' / 'rollout.py'}"

# An H100 80GB reports 81559 MiB (79.6 GiB); about 0.6 GiB goes to the driver / CUDA context before any server.
H100_FREE_GIB = 79.0
# SGLang's reserve on such a GPU at TP1 (tier 60-90 GiB: chunked prefill 8192, 256 decode graphs, 58 prefill graphs)
RESERVE_TP1 = (512 + 1.5 * 8192 + 1024 / 8 + 2 * 256 + 8 * 58) / 1024      # 13.58 GiB
MEMORY_HOOK = SGLANG_TEST_DEPS / "sglang" / "srt" / "arg_groups" / "memory_hook.py"
CUDA_GRAPH_HOOK = SGLANG_TEST_DEPS / "sglang" / "srt" / "arg_groups" / "cuda_graph_hook.py"


def test_runtime_reserve_is_sglangs_own_rule():
    """The issue's figures for an 80 GiB GPU: 512 MiB + 1.5 MiB x 8192 + TP/8 GiB + 2 MiB x (256 at TP<4, 512 at
    TP>=4) = 13.125 GiB at TP1 and 14.5 GiB at TP8; SGLang 0.5.23 adds 8 MiB per prefill CUDA-graph capture size
    (reserve_for_graph_mb; breakable prefill graphs are its default on CUDA), 58 sizes up to 8192 tokens."""
    assert sglang_defaults(80) == (8192, 256) and sglang_defaults(80, tp=8) == (8192, 512)
    assert sglang_runtime_reserve_gib(80, tp=1, prefill_cuda_graph=False) == 13.125
    assert sglang_runtime_reserve_gib(80, tp=8, prefill_cuda_graph=False) == 14.5
    assert sglang_runtime_reserve_gib(80, tp=1) == pytest.approx(13.578, abs=1e-3) == RESERVE_TP1
    assert sglang_runtime_reserve_gib(80, tp=8) == pytest.approx(14.953, abs=1e-3)
    assert (round(sglang_runtime_reserve_gib(80, tp=1), 1), round(sglang_runtime_reserve_gib(80, 8), 1)) == (13.6, 15.0)
    # the chunked-prefill size drives activations and prefill graphs; 10 GiB stays a floor above 60 GiB
    assert sglang_runtime_reserve_gib(80, chunked_prefill_size=2048) == 10.0
    assert sglang_runtime_reserve_gib(80, chunked_prefill_size=16384) > sglang_runtime_reserve_gib(80) + 12
    assert sglang_runtime_reserve_gib(40) == pytest.approx((512 + 1.5 * 4096 + 128 + 2 * 32 + 8 * 50) / 1024)
    assert sglang_runtime_reserve_gib(141, tp=8) == sglang_runtime_reserve_gib(80, tp=8)  # H200: same tier
    with pytest.raises(ConfigError, match="tp >= 1"):
        sglang_runtime_reserve_gib(80, tp=0)


def _sglang_function(path, name):
    """One plain-Python function of an SGLang module, compiled from the wheel's source alone (the module imports
    torch and CUDA packages, so it is never imported)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    fn = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == name)
    ns = {}
    exec(compile(ast.Module(body=[fn], type_ignores=[]), str(path), "exec"), ns)  # noqa: S102 (sglang's own)
    return ns[name]


def test_runtime_reserve_follows_the_wheels_source():
    if not MEMORY_HOOK.exists():
        pytest.skip(f"the sglang wheel is not unpacked in {SGLANG_TEST_DEPS} (tools/setup.sh)")
    # the prefill capture sizes are SGLang's own function, run from its source
    theirs = _sglang_function(CUDA_GRAPH_HOOK, "generate_prefill_cuda_graph_batch_sizes")
    for max_tokens in (2048, 4096, 8192, 16384):
        assert prefill_cuda_graph_sizes(max_tokens) == theirs(max_tokens)
    assert len(theirs(8192)) == 58 and len(theirs(4096)) == 50
    # every term of the rule, as handle_gpu_memory_settings / reserve_for_graph_mb write it
    src = MEMORY_HOOK.read_text(encoding="utf-8")
    for term in ("reserved_mem = 512", "reserved_mem += activation_tokens * 1.5",
                 "activation_tokens = max(cfg.chunked_prefill_size, 2048)",
                 "reserved_mem += cfg.tp_size * cfg.pp_size / 8 * 1024",
                 "reserved_mem += reserve_for_graph_mb(server_args)",
                 "if gpu_mem is not None and gpu_mem > 60 * 1024:", "reserved_mem = max(reserved_mem, 10 * 1024)",
                 "reserved_mem += decode_cuda_graph_config.max_bs * 2",
                 "reserved_mem += len(prefill_cuda_graph_config.bs) * 8",
                 "round((gpu_mem - reserved_mem) / gpu_mem, 3)"):
        assert term in src, term
    # the H100 tier: chunked prefill 8k, decode graphs up to 256 below TP4 and 512 from it
    tier = src[src.index("elif gpu_mem < 90 * 1024:"):src.index("elif gpu_mem < 160 * 1024:")]
    assert "chunked_prefill_size=8192" in tier and "max_bs = 256" in tier and "max_bs = 512" in tier


def test_parameter_counts_and_kv_sizes_from_config():
    # Meta's model cards: 8.03B and 70.6B parameters
    assert llama_param_count(LLAMA3_8B) == 8_030_261_248
    assert llama_param_count(LLAMA3_70B) == 70_553_706_496
    m8, m70 = ModelMemory.from_hf_config(LLAMA3_8B), ModelMemory.from_hf_config(LLAMA3_70B, tp=8)
    assert m8.weights_gib == pytest.approx(8_030_261_248 * 2 / GIB)                  # bf16: 14.96 GiB
    assert m70.weights_gib == pytest.approx(70_553_706_496 * 2 / 8 / GIB)            # 16.43 GiB per GPU
    assert m8.kv_bytes_per_token == 2 * 32 * 8 * 128 * 2                              # 128 KiB
    assert m70.kv_bytes_per_token == 2 * 80 * 1 * 128 * 2                             # 8 KV heads over TP8
    # a reward model's head is num_labels x hidden, not vocab x hidden
    rm = dict(LLAMA3_8B, architectures=["LlamaForSequenceClassification"], num_labels=1)
    assert llama_param_count(rm) == 8_030_261_248 - 128256 * 4096 + 4096
    with pytest.raises(ConfigError, match="hidden_size"):
        llama_param_count({"vocab_size": 10})


def _min_tokens(recipe):
    """One batch at full context: the K samples of one prompt (policy); one comparison in both orders, each
    prompt + two responses (judge)."""
    c = get_recipe(recipe)
    return c.rollout.sampling.n * c.train.max_seq_len, 2 * 2 * c.train.max_seq_len


def test_8b_recipe_one_node():
    """launch/torchrun_inpo.sh: 8 TP1 policy servers on GPUs 0-7, then the PM judge on GPU 0. SGLang's own
    13.58 GiB runtime reserve per server on an 80 GB GPU at TP1; the KV left on GPU 0 is split equally. The judge's
    KV depends on how much of its reserve policy server 0 holds when the judge starts: 10.93 GiB if 1 GiB
    (context + CUDA graphs, the plan's figure), 4.68 GiB if all of it; never more than planned."""
    pol_min, judge_min = _min_tokens("llama3_8b_h100")
    m = ModelMemory.from_hf_config(LLAMA3_8B)
    slots = [ServerSlot(f"policy {i}", m, (i,), pol_min) for i in range(8)] + [ServerSlot("judge", m, (0,), judge_min)]
    plans = {p.name: p for p in plan_server_memory(slots, H100_FREE_GIB)}
    p0, p1, j = plans["policy 0"], plans["policy 1"], plans["judge"]
    assert (p0.mem_fraction, p1.mem_fraction, j.mem_fraction) == (0.328, 0.828, 0.497)
    assert p0.kv_gib == pytest.approx(10.95, abs=0.01) and p1.kv_gib == pytest.approx(50.45, abs=0.01)
    assert (round(j.kv_min_gib, 2), round(j.kv_gib, 2)) == (4.68, 10.93)   # 38k-90k tokens
    assert j.free_at_start_gib == pytest.approx(79 - 14.96 - 10.95 - 1.0, abs=0.01)  # what policy 0 left
    assert all(p.reserve_gib == RESERVE_TP1 for p in plans.values())
    # SGLang's rule reproduces the planned KV: f * free_at_start - weights
    for p in plans.values():
        assert p.kv_gib == pytest.approx(p.mem_fraction * p.free_at_start_gib - m.weights_gib)
        assert p.kv_min_tokens >= max(pol_min, judge_min)
    # GPU 0 holds both at peak: weights + KV + reserve of each fit in 79 GiB (with the judge's largest KV)
    assert 2 * (m.weights_gib + RESERVE_TP1) + p0.kv_gib + j.kv_gib <= H100_FREE_GIB

    # The fractions the script passed before (policy 0.35 everywhere, judge 0.3): the judge sees ~38 GiB free
    # and 0.3 of it is less than its 14.96 GiB of weights: no KV cache at all, SGLang refuses to start.
    old = [ServerSlot(s.name, s.model, s.gpus, s.min_kv_tokens, 0.35 if s.name != "judge" else 0.3) for s in slots]
    with pytest.raises(MemoryPlanError, match=r"judge \(GPUs 0\): mem_fraction 0.300 of the 37.8 GiB free at its "
                                              r"start \(.*\) leaves no KV cache"):
        plan_server_memory(old, H100_FREE_GIB)
    # ... and even if policy 0 held only 1 GiB beyond its pool then: 0.3 x 50.35 - 14.96 = 0.15 GiB (1.2k tokens)
    best = 0.3 * (H100_FREE_GIB - 0.35 * H100_FREE_GIB - 1.0) - m.weights_gib
    assert 0 < best < 0.2


def test_70b_recipe_nodes():
    """launch/slurm_inpo.sbatch: node 0 runs a TP8 policy server on GPUs 0-7 and the judge on GPU 0; nodes 1-3 a
    TP8 policy server only."""
    pol_min, judge_min = _min_tokens("llama3_70b_h100")
    m70, m8 = ModelMemory.from_hf_config(LLAMA3_70B, tp=8), ModelMemory.from_hf_config(LLAMA3_8B)
    node0 = plan_server_memory([ServerSlot("policy", m70, tuple(range(8)), pol_min),
                                ServerSlot("judge", m8, (0,), judge_min)], H100_FREE_GIB)
    assert [p.mem_fraction for p in node0] == [0.328, 0.47]
    assert [round(p.kv_gib, 2) for p in node0] == [9.48, 9.52]         # per GPU; the policy's is 249k tokens
    assert round(node0[1].kv_min_gib, 2) == 2.97                       # judge: 24k tokens at the least
    assert node0[0].kv_tokens == pytest.approx(9.48 * GIB / 40960, rel=1e-3)
    assert [round(p.reserve_gib, 2) for p in node0] == [14.95, 13.58]  # SGLang's reserve at TP8 and at TP1
    other = plan_server_memory([ServerSlot("policy", m70, tuple(range(8)), pol_min)], H100_FREE_GIB)
    assert other[0].mem_fraction == 0.81 and round(other[0].kv_gib, 2) == 47.56
    # before: policy 0.5, judge 0.2 -> the judge gets 0.2 x 29.5 GiB = 5.9 GiB for 15 GiB of weights
    with pytest.raises(MemoryPlanError, match="judge.*leaves no KV cache"):
        plan_server_memory([ServerSlot("policy", m70, tuple(range(8)), pol_min, 0.5),
                            ServerSlot("judge", m8, (0,), judge_min, 0.2)], H100_FREE_GIB)


def test_too_small_gpu_fails_naming_the_server():
    m = ModelMemory.from_hf_config(LLAMA3_8B)
    slots = [ServerSlot("policy 0", m, (0,), 32768), ServerSlot("judge", m, (0,), 16384)]
    with pytest.raises(MemoryPlanError) as e:
        plan_server_memory(slots, 40.0)  # a 40 GB GPU cannot hold two 8B servers with their reserves
    assert "policy 0 (GPUs 0)" in str(e.value) and "judge (GPUs 0)" in str(e.value)
    with pytest.raises(MemoryPlanError, match="GPU 0: .* exceed"):
        plan_server_memory([ServerSlot("a", m, (0,), 1, 0.8), ServerSlot("b", m, (0,), 1, 0.9)], 79.0)
    with pytest.raises(MemoryPlanError, match="for every server"):
        plan_server_memory([ServerSlot("a", m, (0,), 1, 0.8), ServerSlot("b", m, (1,), 1)], 79.0)


def _models(tmp_path):
    for name, cfg in (("sft", LLAMA3_8B), ("pm", LLAMA3_8B)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text(json.dumps(cfg))
    return tmp_path / "sft", tmp_path / "pm"


def test_plan_cli(tmp_path):
    sft, pm = _models(tmp_path)
    base = [sys.executable, str(REPO / "launch/sglang_servers.py"), "plan", "--policy-model", str(sft),
            "--policy-servers", "8", "--judge-model", str(pm), "--judge-gpus", "0", "--gpu-memory-gib", "79"]
    out = subprocess.run(base, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["POLICY_MEM_FRACTIONS=0.328," + ",".join(["0.828"] * 7), "JUDGE_MEM_FRACTIONS=0.497"]
    out = subprocess.run(base + ["--policy-mem-fraction", "0.35", "--judge-mem-fraction", "0.3"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and out.stdout == "" and "judge 0 (GPUs 0)" in out.stderr and "no KV cache" in out.stderr
    out = subprocess.run(base[:4] + [str(tmp_path / "nope"), "--gpu-memory-gib", "79"], capture_output=True,
                         text=True, timeout=60)
    assert out.returncode != 0 and "config.json not found" in out.stderr


def _plan_fraction(sft, *extra):
    out = subprocess.run([sys.executable, str(REPO / "launch/sglang_servers.py"), "plan", "--policy-model", str(sft),
                          *extra], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return float(out.stdout.split("=")[1])


def test_plan_of_8b_at_tp1_is_at_or_below_sglangs_own_default(tmp_path):
    """Llama-3-8B alone at TP1 on an 80 GiB GPU: SGLang's own default fraction is round((gpu - reserve) / gpu, 3)
    (memory_hook.py) = 0.830; the plan's must not exceed it (it gave 0.875 with a flat 10 GiB reserve, and the
    server's first large prefill could then run out of memory)."""
    sft, _ = _models(tmp_path)
    sglang_default = round((80 * 1024 - RESERVE_TP1 * 1024) / (80 * 1024), 3)
    assert sglang_default == 0.830
    assert _plan_fraction(sft, "--gpu-memory-gib", "80") <= sglang_default
    # with 0.6 GiB already taken by the driver, against SGLang's figure for the 80 GiB it sees in nvidia-smi
    assert _plan_fraction(sft, "--gpu-memory-gib", "79.4", "--gpu-total-gib", "80") <= sglang_default
    # --runtime-reserve-gib still overrides the rule; a larger --chunked-prefill-size reserves more
    assert _plan_fraction(sft, "--gpu-memory-gib", "80", "--runtime-reserve-gib", "10") == 0.875
    assert _plan_fraction(sft, "--gpu-memory-gib", "80", "--chunked-prefill-size", "16384") < sglang_default


def _script_env(tmp_path, **extra):
    """PATH with a stand-in `megatron-inpo` that records its arguments instead of running the driver, and an
    API-compatible SGLang server (tests/helpers/rollout.py) behind a wrapper that records its command line."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, body in (("megatron-inpo", f"printf '%s\\n' \"$@\" > {tmp_path / 'driver_args.txt'}"),
                       ("fake-sglang", f"echo \"$@\" >> {tmp_path / 'server_argv.txt'}\n{FAKE_SERVER} \"$@\"")):
        f = bin_dir / name
        f.write_text(f"#!/bin/sh\n{body}\n")
        f.chmod(f.stat().st_mode | stat.S_IXUSR)
    sft, pm = _models(tmp_path)
    return {**os.environ, "PATH": f"{bin_dir}:{Path(sys.executable).parent}:{os.environ['PATH']}",
            "SFT_MODEL": str(sft), "PM_MODEL": str(pm), "RUN_DIR": str(tmp_path / "run"), "GPU_MEMORY_GIB": "79",
            "SGLANG_SERVER_CMD": str(bin_dir / "fake-sglang"), "POLICY_SERVERS": "2",
            "POLICY_PORT": str(free_port_pair()), "JUDGE_PORT": str(free_port_pair()), **extra}


def test_torchrun_script_starts_planned_deterministic_servers(tmp_path):
    env = _script_env(tmp_path)
    out = subprocess.run(["bash", str(REPO / "launch/torchrun_inpo.sh"), "llama3_8b_h100", "--iterations=1"],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stderr[-3000:]
    argv = [line.split() for line in (tmp_path / "server_argv.txt").read_text().splitlines()]
    assert len(argv) == 3  # the two policy servers (started together: in either order), then the judge
    argv[:2] = sorted(argv[:2], key=lambda a: int(a[a.index("--port") + 1]))  # policy 0 has the lower port
    frac = [a[a.index("--mem-fraction-static") + 1] for a in argv]
    # two policy servers on GPUs 0, 1 and the judge on GPU 0 of a 79 GiB GPU: the plan's fractions
    assert frac == ["0.328", "0.828", "0.497"]
    assert all("--enable-deterministic-inference" in a and "--enable-memory-saver" in a for a in argv)
    # one random API key per launch for every server; the driver gets it through the environment only
    keys = {a[a.index("--api-key") + 1] for a in argv}
    assert len(keys) == 1 and len(keys.pop()) == 64
    assert argv[2][argv[2].index("--model-path") + 1] == env["PM_MODEL"]
    args = (tmp_path / "driver_args.txt").read_text().split("\n")
    assert "--iterations=1" in args and "--server_memory_saver=true" in args
    assert "--rollout.api_key=env:INPO_SGLANG_API_KEY" in args and "--judge.api_key=env:INPO_SGLANG_API_KEY" in args
    urls = [a for a in args if a.startswith("--rollout.server_urls=")][0]
    assert urls == f"--rollout.server_urls=[http://127.0.0.1:{env['POLICY_PORT']},http://127.0.0.1:" \
                   f"{int(env['POLICY_PORT']) + 1}]"
    assert "stopped 2 server(s)" in out.stdout and "stopped 1 server(s)" in out.stdout  # the EXIT trap

    # SGLANG_DETERMINISTIC=0: no flag, and the script says plainly what that costs
    (tmp_path / "server_argv.txt").unlink()
    env.update(SGLANG_DETERMINISTIC="0", POLICY_PORT=str(free_port_pair()), JUDGE_PORT=str(free_port_pair()))
    out = subprocess.run(["bash", str(REPO / "launch/torchrun_inpo.sh")], cwd=REPO, env=env, capture_output=True,
                         text=True, timeout=180)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "rollouts will not be reproducible" in out.stderr
    assert "--enable-deterministic-inference" not in (tmp_path / "server_argv.txt").read_text()


def test_torchrun_script_stops_before_servers_when_memory_does_not_fit(tmp_path):
    env = _script_env(tmp_path, GPU_MEMORY_GIB="40")
    out = subprocess.run(["bash", str(REPO / "launch/torchrun_inpo.sh")], cwd=REPO, env=env, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 2
    assert "judge 0 (GPUs 0)" in out.stderr and "below its minimum" in out.stderr
    assert "started SGLang server" not in out.stderr and not (tmp_path / "driver_args.txt").exists()


def test_sbatch_servers_get_a_random_key_per_job(tmp_path):
    """launch/slurm_inpo.sbatch's server branch on one "node", with stand-ins for srun (runs the step's command
    here) and scontrol: every server gets the same random --api-key, the driver gets it only through the
    environment (env:INPO_SGLANG_API_KEY, so config.yaml holds no key), and a second job gets another key."""
    env = _script_env(tmp_path, POLICY_TP="8", SLURM_JOB_NODELIST="node0", SLURM_NNODES="1", SLURM_JOB_ID="7",
                      LAUNCH_DIR=str(REPO / "launch"))
    bin_dir = tmp_path / "bin"
    for name, body in (("srun", 'while [ $# -gt 0 ]; do case "$1" in -w) shift 2;; -*) shift;; *) break;; esac; '
                                'done\nexec "$@"'),
                       ("scontrol", "echo 127.0.0.1"),
                       ("megatron-inpo", f"printf '%s\\n' \"$@\" > {tmp_path / 'driver_args.txt'}\n"
                                         f"printf '%s' \"$INPO_SGLANG_API_KEY\" >> {tmp_path / 'driver_keys.txt'}\n"
                                         f"echo >> {tmp_path / 'driver_keys.txt'}")):
        f = bin_dir / name
        f.write_text(f"#!/bin/sh\n{body}\n")
        f.chmod(f.stat().st_mode | stat.S_IXUSR)
    for job in range(2):
        env.update(POLICY_PORT=str(free_port_pair()), JUDGE_PORT=str(free_port_pair()), SLURM_JOB_ID=str(7 + job))
        out = subprocess.run(["bash", str(REPO / "launch/slurm_inpo.sbatch"), "--iterations=1"], cwd=tmp_path,
                             env=env, capture_output=True, text=True, timeout=240)
        assert out.returncode == 0, out.stderr[-3000:]
    argv = [line.split() for line in (tmp_path / "server_argv.txt").read_text().splitlines()]
    keys = [a[a.index("--api-key") + 1] for a in argv]
    driver_keys = (tmp_path / "driver_keys.txt").read_text().split()
    assert len(argv) == 4 and keys == [driver_keys[0]] * 2 + [driver_keys[1]] * 2  # policy, judge; per job
    assert driver_keys[0] != driver_keys[1] and all(len(k) == 64 for k in driver_keys)
    args = (tmp_path / "driver_args.txt").read_text()
    assert "--rollout.api_key=env:INPO_SGLANG_API_KEY" in args and "--judge.api_key=env:INPO_SGLANG_API_KEY" in args
    assert driver_keys[1] not in args
    assert not any(k in p.read_text() for p in (tmp_path / "run").glob("*.json") for k in driver_keys)
