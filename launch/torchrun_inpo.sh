#!/usr/bin/env bash
# One node (e.g. 8xH100): SGLang servers for the policy and the judge, then the INPO driver.
#
#   bash launch/torchrun_inpo.sh [RECIPE] [--key=value ...]
#   RECIPE defaults to llama3_8b_h100; e.g. bash launch/torchrun_inpo.sh llama3_8b_h100 --run_dir=runs/x
#
# The driver runs every Megatron stage (convert, log-probs, train) as `torchrun --standalone --nproc-per-node 8
# -m megatron_inpo ...` itself (parallel.nproc_per_node), one stage at a time, so each stage's GPU memory is freed
# when it exits. The SGLang servers keep their weights resident between iterations; with --enable-memory-saver
# the driver asks them to release GPU memory before each Megatron stage and to resume it before rollout / judging
# (rollout.release_memory / server_memory_saver below), so policy servers, the PM and training share the 8 GPUs.
set -euo pipefail
RECIPE="${1:-llama3_8b_h100}"; shift || true
RUN_DIR="${RUN_DIR:-runs/${RECIPE}}"
SFT_MODEL="${SFT_MODEL:-models/LLaMA3-SFT}"                      # pi_ref (HF directory)
PM_MODEL="${PM_MODEL:-models/pair-preference-model-LLaMA3-8B}"   # the judge (HF directory)
POLICY_TP="${POLICY_TP:-1}"; POLICY_SERVERS="${POLICY_SERVERS:-8}"
mkdir -p "$RUN_DIR"

# Policy servers: 8 x TP1 data-parallel replicas of pi_ref; the driver reloads pi_t into them from disk
# (/update_weights_from_disk + cache flush) at the start of every iteration.
python launch/sglang_servers.py start --model-path "$SFT_MODEL" --num-servers "$POLICY_SERVERS" --tp "$POLICY_TP" \
    --base-port 30000 --mem-fraction 0.35 --extra-args "--enable-memory-saver" \
    --state "$RUN_DIR/sglang_policy.json" --log-dir "$RUN_DIR/sglang_logs" > "$RUN_DIR/policy_urls.txt"
# Judge: the pairwise preference model, on GPU 0 beside policy server 0 (memory fractions add up below 0.9).
python launch/sglang_servers.py start --model-path "$PM_MODEL" --num-servers 1 --tp 1 --gpus 0 \
    --base-port 30100 --mem-fraction 0.3 --extra-args "--enable-memory-saver" \
    --state "$RUN_DIR/sglang_judge.json" --log-dir "$RUN_DIR/sglang_logs" > "$RUN_DIR/judge_urls.txt"
trap 'python launch/sglang_servers.py stop --state "$RUN_DIR/sglang_policy.json"; \
      python launch/sglang_servers.py stop --state "$RUN_DIR/sglang_judge.json"' EXIT

POLICY_URLS="[$(cat "$RUN_DIR/policy_urls.txt")]"
JUDGE_URLS="[$(cat "$RUN_DIR/judge_urls.txt")]"
# MASTER_PORT in this project's range: several runs on one node must not collide.
megatron-inpo run --recipe "$RECIPE" --run_dir="$RUN_DIR" --model.hf_path="$SFT_MODEL" \
    --judge.model_path="$PM_MODEL" --rollout.server_urls="$POLICY_URLS" --judge.server_urls="$JUDGE_URLS" \
    --parallel.nproc_per_node=8 --parallel.master_port="${MASTER_PORT:-29700}" \
    --server_memory_saver=true "$@"
