#!/usr/bin/env bash
# One node (e.g. 8xH100): SGLang servers for the policy and the judge, then the INPO driver.
#
#   bash launch/torchrun_inpo.sh [RECIPE] [--key=value ...]
#   RECIPE defaults to llama3_8b_h100; e.g. bash launch/torchrun_inpo.sh llama3_8b_h100 --run_dir=runs/x
#
# The driver runs every Megatron stage (convert, log-probs, train) as `torchrun --standalone --nproc-per-node 8
# -m megatron_inpo ...` itself (launch.nproc_per_node), one stage at a time, so each stage's GPU memory is freed
# when it exits. The SGLang servers keep their weights resident between iterations; with --enable-memory-saver
# the driver asks them to release GPU memory before each Megatron stage and to resume it before rollout / judging
# (rollout.release_memory / server_memory_saver below), so policy servers, the PM and training share the 8 GPUs.
#
# Environment: SFT_MODEL, PM_MODEL (HF directories), RUN_DIR, POLICY_TP, POLICY_SERVERS, POLICY_PORT (30000),
# JUDGE_PORT (30100), MASTER_PORT (29700); GPU_MEMORY_GIB (free GiB per GPU for the memory plan; default
# nvidia-smi); SGLANG_DETERMINISTIC=0 starts the servers without --enable-deterministic-inference (faster, but
# SGLang then ignores sampling_seed: rollouts are not reproducible); SGLANG_SERVER_CMD replaces
# `python -m sglang.launch_server` (tests).
set -euo pipefail
RECIPE="${1:-llama3_8b_h100}"; shift || true
RUN_DIR="${RUN_DIR:-runs/${RECIPE}}"
SFT_MODEL="${SFT_MODEL:-models/LLaMA3-SFT}"                      # pi_ref (HF directory)
PM_MODEL="${PM_MODEL:-models/pair-preference-model-LLaMA3-8B}"   # the judge (HF directory)
POLICY_TP="${POLICY_TP:-1}"; POLICY_SERVERS="${POLICY_SERVERS:-8}"
POLICY_PORT="${POLICY_PORT:-30000}"; JUDGE_PORT="${JUDGE_PORT:-30100}"
mkdir -p "$RUN_DIR"

# A random API key per launch (SGLang's --api-key: every call but /health needs it): other users of the node can
# reach 127.0.0.1 too. It travels in the environment only; the driver reads it through env:, so config.yaml holds
# `env:INPO_SGLANG_API_KEY`, not the key. Set INPO_SGLANG_API_KEY to choose the key.
INPO_SGLANG_API_KEY="${INPO_SGLANG_API_KEY:-$(head -c 32 /dev/urandom | od -An -v -tx1 | tr -d ' \n')}"
export INPO_SGLANG_API_KEY
SERVER_ARGS=("--extra-args=--enable-memory-saver"   # "=": argparse reads a separate "--..." as an option
             --api-key env:INPO_SGLANG_API_KEY)
if [ "${SGLANG_DETERMINISTIC:-1}" = 1 ]; then
  SERVER_ARGS+=(--deterministic)   # the recipes seed every sample (rollout.sampling.seed)
else
  echo "WARNING: SGLANG_DETERMINISTIC=0: servers ignore sampling_seed, rollouts will not be reproducible" >&2
fi
[ -n "${SGLANG_SERVER_CMD:-}" ] && SERVER_ARGS+=(--server-cmd "$SGLANG_SERVER_CMD")

# Memory plan: SGLang sizes each server's KV cache from the memory free when it starts, so the judge on GPU 0,
# started after policy server 0, needs a fraction of what the policy left, not of the GPU. `plan` computes the
# fractions from the models' config.json and stops here, naming the server, if one would get too little KV cache.
PLAN="$(python launch/sglang_servers.py plan --policy-model "$SFT_MODEL" --policy-servers "$POLICY_SERVERS" \
    --policy-tp "$POLICY_TP" --judge-model "$PM_MODEL" --judge-gpus 0 \
    ${GPU_MEMORY_GIB:+--gpu-memory-gib "$GPU_MEMORY_GIB"})"
eval "$PLAN"   # POLICY_MEM_FRACTIONS=f0,f1,...  JUDGE_MEM_FRACTIONS=f

# Policy servers: 8 x TP1 data-parallel replicas of pi_ref; the driver reloads pi_t into them from disk
# (/update_weights_from_disk + cache flush) at the start of every iteration.
trap 'python launch/sglang_servers.py stop --state "$RUN_DIR/sglang_policy.json" || true; \
      python launch/sglang_servers.py stop --state "$RUN_DIR/sglang_judge.json" || true' EXIT
python launch/sglang_servers.py start --model-path "$SFT_MODEL" --num-servers "$POLICY_SERVERS" --tp "$POLICY_TP" \
    --base-port "$POLICY_PORT" --mem-fraction "$POLICY_MEM_FRACTIONS" "${SERVER_ARGS[@]}" \
    --state "$RUN_DIR/sglang_policy.json" --log-dir "$RUN_DIR/sglang_logs" > "$RUN_DIR/policy_urls.txt"
# Judge: the pairwise preference model, on GPU 0 beside policy server 0, started only once that one is healthy
# (the plan's order).
python launch/sglang_servers.py start --model-path "$PM_MODEL" --num-servers 1 --tp 1 --gpus 0 \
    --base-port "$JUDGE_PORT" --mem-fraction "$JUDGE_MEM_FRACTIONS" "${SERVER_ARGS[@]}" \
    --state "$RUN_DIR/sglang_judge.json" --log-dir "$RUN_DIR/sglang_logs" > "$RUN_DIR/judge_urls.txt"

POLICY_URLS="[$(cat "$RUN_DIR/policy_urls.txt")]"
JUDGE_URLS="[$(cat "$RUN_DIR/judge_urls.txt")]"
# MASTER_PORT in this project's range: several runs on one node must not collide.
megatron-inpo run --recipe "$RECIPE" --run_dir="$RUN_DIR" --model.hf_path="$SFT_MODEL" \
    --judge.model_path="$PM_MODEL" --rollout.server_urls="$POLICY_URLS" --judge.server_urls="$JUDGE_URLS" \
    --launch.nproc_per_node=8 --launch.master_port="${MASTER_PORT:-29700}" \
    --server_memory_saver=true --rollout.api_key=env:INPO_SGLANG_API_KEY \
    --judge.api_key=env:INPO_SGLANG_API_KEY "$@"
