"""The multi-node launch path of the driver (launch.launcher='rdzv', as launch/slurm_inpo.sbatch uses it) run for
real on one machine: two torchrun agents (launch/local_nodes.sh stands in for srun) meet at a c10d rendezvous on
127.0.0.1, 4 ranks each, and train at TP=2 x PP=2 x DP=2 with the same step losses as one process."""
import json
import socket
import sys
import time
from pathlib import Path

import pytest

from tests.helpers.engine import REPO, convert_to_mcore, make_pairs, tiny_hf_model, write_pairs
from megatron_inpo.config import validate_all
from megatron_inpo.driver.config import LaunchConfig
from megatron_inpo.engine.config import ParallelConfig
from megatron_inpo.driver.recipes import get_recipe
from megatron_inpo.driver.stages import MegatronStages

pytestmark = pytest.mark.megatron


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _cfg(launch: LaunchConfig, parallel: ParallelConfig | None = None):
    cfg = get_recipe("tiny_cpu")
    cfg.launch = launch
    cfg.megatron.parallel = parallel or ParallelConfig()
    # 24 pairs, global batch 8 -> 3 optimizer steps; at DP=2 each rank runs 2 micro-batches of 2 pairs
    t = cfg.train
    t.global_batch_size, t.micro_batch_size, t.epochs, t.lr, t.warmup_ratio = 8, 2, 1, 1e-3, 0.0
    t.save_interval = 0
    cfg.megatron.model.precision, cfg.megatron.model.layer_spec = "fp32", "local"
    cfg.sft.micro_batch_size = cfg.sft.global_batch_size // (launch.world_size // parallel.model_parallel_size
                                                             if parallel else launch.world_size)
    validate_all(cfg)
    return cfg


def _losses(out: Path) -> list[tuple[int, float, float]]:
    rows = [json.loads(x) for x in (out / "tensorboard" / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"], r["grad_norm"]) for r in rows]


def test_rdzv_command_is_one_agent_per_node(tmp_path, monkeypatch):
    """What the driver runs for a multi-node stage: node_runner, then this interpreter's torchrun with the
    rendezvous flags, environment variables expanded at launch (the sbatch passes them unexpanded)."""
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("SLURM_JOB_ID", "42")
    p = LaunchConfig(nproc_per_node=8, nnodes=4, launcher="rdzv", rdzv_endpoint="${MASTER_ADDR}:29700",
                     rdzv_id="${SLURM_JOB_ID}")
    p.validate()
    cmd = MegatronStages(_cfg(LaunchConfig()), tmp_path).command(["train", "--config", "x.yaml"])
    assert cmd[:3] == [sys.executable, "-m", "megatron_inpo"]  # one process: no launcher at all
    cfg = get_recipe("llama3_70b_h100")
    assert cfg.launch.launcher == "rdzv"
    cmd = MegatronStages(cfg, tmp_path).command(["train", "--config", "x.yaml"])
    assert cmd == ["srun", "--overlap", "--ntasks-per-node=1", "--kill-on-bad-exit=1", sys.executable, "-m",
                   "torch.distributed.run", "--nnodes", "4", "--nproc-per-node", "8", "--rdzv-backend", "c10d",
                   "--rdzv-endpoint", "127.0.0.1:29700", "--rdzv-id", "42", "-m", "megatron_inpo", "train",
                   "--config", "x.yaml"]


@pytest.mark.parametrize("bad,field", [
    (dict(launcher="rdzv", rdzv_endpoint="127.0.0.1"), "launch.rdzv_endpoint"),
    (dict(launcher="rdzv", node_runner=" "), "launch.node_runner"),
    (dict(nnodes=2), "launch.launcher"),
])
def test_rdzv_config_errors_name_the_field(bad, field):
    from megatron_inpo.config import ConfigError
    from megatron_inpo.driver.config import RunConfig

    with pytest.raises(ConfigError, match="^" + field.replace(".", r"\.")):
        validate_all(RunConfig(launch=LaunchConfig(**bad)))


@pytest.mark.slow
def test_two_torchrun_agents_tp2_pp2_dp2_match_one_process(tmp_path):
    """The driver's train stage (MegatronStages.train: the stage YAML and the launch command it builds) once at
    TP=2 x PP=2 x DP=2 over two local 'nodes' of 4 ranks, once as one process: the same three step losses and
    gradient norms. fp32 on CPU: the layouts differ only in the order of reductions (the engine's parallel
    tests measure ~1e-9 relative), so 1e-6 relative is a margin of ~1000 that still catches any real mismatch
    (a wrong micro-batch split or a missing gradient all-reduce moves the loss of step 2 by > 1e-3)."""
    tiny_hf_model(seed=0).save_pretrained(tmp_path / "hf")
    convert_to_mcore(tmp_path / "hf", tmp_path / "init_ckpt", tp=2)
    data = write_pairs(tmp_path / "pairs.jsonl", make_pairs(24, seed=3))

    port = _free_port()
    multi = _cfg(LaunchConfig(nproc_per_node=4, nnodes=2, launcher="rdzv",
                              node_runner=f"bash {REPO}/launch/local_nodes.sh 2", rdzv_endpoint=f"127.0.0.1:{port}",
                              rdzv_id="test-two-agents"),
                 ParallelConfig(tensor_model_parallel_size=2, pipeline_model_parallel_size=2))
    multi.stage_timeout_s = 900.0  # the stage's whole process group is killed past it (no stray ranks)
    one = _cfg(LaunchConfig())
    one.stage_timeout_s = 600.0

    t0 = time.perf_counter()
    stages = MegatronStages(multi, tmp_path / "run_multi")
    try:
        final, _ = stages.train(data, tmp_path / "init_ckpt", tmp_path / "run_multi" / "iter_01" / "train")
    finally:
        stages.close()  # the stage worker, CPU's default runner: its 8 ranks exit
    t_multi = time.perf_counter() - t0
    log = (tmp_path / "run_multi" / "logs" / "train_iter_01.log").read_text()
    assert "launch/local_nodes.sh 2" in log and "--rdzv-endpoint" in log and "--nnodes 2" in log
    t0 = time.perf_counter()
    stages = MegatronStages(one, tmp_path / "run_one")
    try:
        stages.train(data, tmp_path / "init_ckpt", tmp_path / "run_one" / "iter_01" / "train")
    finally:
        stages.close()
    t_one = time.perf_counter() - t0

    got, want = _losses(tmp_path / "run_multi/iter_01/train"), _losses(tmp_path / "run_one/iter_01/train")
    assert [s for s, *_ in got] == [s for s, *_ in want] == [1, 2, 3]
    assert len({round(l, 6) for _, l, _ in want}) == 3, "losses do not move: the comparison would be vacuous"
    rel = max(abs(a - b) / abs(b) for (_, a, _), (_, b, _) in zip(got, want))
    grel = max(abs(a - b) / abs(b) for (_, _, a), (_, _, b) in zip(got, want))
    print(f"\ntwo agents x 4 ranks: {t_multi:.0f} s, one process: {t_one:.0f} s; losses {[l for _, l, _ in got]} vs "
          f"{[l for _, l, _ in want]}; max rel diff loss {rel:.2e}, grad norm {grel:.2e}")
    assert rel < 1e-6 and grel < 1e-5, (got, want)
    # the 8-rank run really was TP2 x PP2 x DP2 over two agents: the checkpoint it wrote says so
    meta = json.loads((Path(final) / "megatron_inpo.json").read_text())
    assert (meta["tp"], meta["pp"]) == (2, 2), meta
