"""Engine pieces that need no process group: FLOP counter, metrics log, batch masks, data order, configs, CLI."""
import json

import pytest
import torch

from megatron_inpo.config import ConfigError
from megatron_inpo.data.preferences import DataError, PreferencePair
from megatron_inpo.config import validate_all
from megatron_inpo.engine.batches import (make_pair_batch, make_sequence_batch, plan_micro_batches,
                                          split_micro_batches, step_items)
from megatron_inpo.engine.config import (LogprobStageConfig, MegatronConfig, MegatronModelConfig, ParallelConfig,
                                         TrainConfig, TrainStageConfig, batch_pad_multiple)
from megatron_inpo.engine.metrics import FlopDims, MetricsLog, batch_flops, flops_per_token, throughput

pytestmark = pytest.mark.megatron

TINY = FlopDims(num_layers=2, hidden_size=8, num_heads=2, num_kv_heads=1, head_dim=4, ffn_hidden_size=16,
                vocab_size=32)


def test_flops_by_hand():
    # q = 8, kv = 4. dense = 2*8*(8+8) + 2*8*8 + 2*3*8*16 + 8*32 = 256 + 128 + 768 + 256 = 1408
    # training: 6*1408 + 6*2*8*s; s = 10 -> 8448 + 960 = 9408; forward-only is a third.
    assert flops_per_token(TINY, 10) == 9408
    assert flops_per_token(TINY, 10, training=False) == pytest.approx(3136)
    assert batch_flops(TINY, [10, 10, 5]) == 2 * 10 * 9408 + 5 * (8448 + 480)
    t = throughput(1e12, 1000, 2.0, 989.0)
    assert t["tokens_per_s"] == 500 and t["tflops"] == 0.5 and t["mfu"] == pytest.approx(0.5 / 989)


def test_flops_match_parameter_count_of_a_real_llama():
    # Independent count: every linear weight does 2 FLOPs per token forward, 6 in training; plus attention.
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=96, hidden_size=48, intermediate_size=80, num_hidden_layers=3,
                      num_attention_heads=6, num_key_value_heads=2, tie_word_embeddings=False)
    model = LlamaForCausalLM(cfg)
    linear = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    dims = FlopDims.from_hf_config(cfg.to_dict())
    s = 17
    assert flops_per_token(dims, s) == 6 * linear + 6 * 3 * 48 * s


def test_metrics_log_tensorboard_and_resume(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    log = MetricsLog(tmp_path)
    for step in (1, 2, 3):
        log.log(step, {"loss": 1.0 / step, "lr": 1e-3})
    log.close()
    # resume at step 2: the jsonl keeps step 1 only, then gets the new steps
    log = MetricsLog(tmp_path, resume_step=2)
    log.log(2, {"loss": 7.0})
    log.close()
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [(x["step"], x["loss"]) for x in lines] == [(1, 1.0), (2, 7.0)]
    acc = EventAccumulator(str(tmp_path))
    acc.Reload()
    assert "train/loss" in acc.Tags()["scalars"]
    assert acc.Scalars("train/loss")[0].value == pytest.approx(1.0)


def _pair(prompt, chosen, rejected, **kw):
    return PreferencePair(prompt_id="x", prompt="", prompt_ids=prompt, chosen="", rejected="",
                          chosen_ids=chosen, rejected_ids=rejected, **kw)


def test_pair_batch_masks_are_exact():
    pairs = [_pair([1, 2, 3], [4, 5], [6]), _pair([7], [8, 9, 10, 11], [12, 13])]
    b = make_pair_batch(pairs, indices=[0, 1], pad_multiple=8)
    assert b.tokens.shape == (4, 8) and b.num_pairs == 2
    # rows: chosen0, chosen1, rejected0, rejected1
    assert b.tokens[0].tolist() == [1, 2, 3, 4, 0, 0, 0, 0]
    assert b.labels[0].tolist() == [2, 3, 4, 5, 0, 0, 0, 0]
    assert b.loss_mask[0].tolist() == [0, 0, 1, 1, 0, 0, 0, 0]     # predicts 4 and 5 only
    assert b.loss_mask[1].tolist() == [1, 1, 1, 1, 0, 0, 0, 0]     # prompt of length 1: every position scores
    assert b.loss_mask[2].tolist() == [0, 0, 1, 0, 0, 0, 0, 0]
    assert b.labels[3][:2].tolist() == [12, 13] and b.loss_mask[3].sum() == 2
    # masked labels are exactly the responses
    for row, resp in zip(range(4), [[4, 5], [8, 9, 10, 11], [6], [12, 13]]):
        assert b.labels[row][b.loss_mask[row].bool()].tolist() == resp
    assert b.num_response_tokens == 9 and b.num_real_tokens == 4 + 4 + 3 + 2
    with pytest.raises(DataError, match="empty prompt_ids"):
        make_sequence_batch([([], [1])])
    with pytest.raises(ValueError, match="shorter"):
        make_pair_batch(pairs, pad_to=3)


def test_micro_batch_plan_and_data_order():
    plan = plan_micro_batches([3, 9, 1, 7, 5], 2)
    assert plan == [[1, 3], [4, 0], [2]]
    idx = step_items(0, 10, 4, seed=1, shuffle=True)
    assert len(set(idx)) == 4 and idx == step_items(0, 10, 4, seed=1, shuffle=True)
    # steps of one epoch are disjoint; the next epoch is a new permutation of all items
    e0 = step_items(0, 10, 4, 1, True) + step_items(1, 10, 4, 1, True)
    assert len(set(e0)) == 8
    assert step_items(2, 10, 4, 1, False) == [0, 1, 2, 3]
    lengths = list(range(10))
    mb0 = split_micro_batches(list(range(8)), lengths, 2, dp_size=2, dp_rank=0)
    mb1 = split_micro_batches(list(range(8)), lengths, 2, dp_size=2, dp_rank=1)
    assert sorted(i for mb in mb0 + mb1 for i in mb) == list(range(8))
    assert mb0 == [[7, 6], [3, 2]] and mb1 == [[5, 4], [1, 0]]


def _stage(**kw) -> TrainStageConfig:
    return TrainStageConfig(data="d", init_checkpoint="c", output_dir="o", **kw)


def _engine(parallel: dict | None = None, **model) -> MegatronConfig:
    return MegatronConfig(parallel=ParallelConfig(**(parallel or {})), model=MegatronModelConfig(**model))


def test_train_config_validation():
    validate_all(_stage())
    bad = [  # (section, field, value, the dotted name the message must carry)
        (None, "loss", "rl", "loss"), ("train", "global_batch_size", 130, "train.global_batch_size"),
        ("train", "lr", 0.0, "train.lr"), ("train", "lr", float("inf"), "train.lr"),
        ("train", "warmup_ratio", 1.0, "train.warmup_ratio"), ("train", "micro_batch_size", 0, "train.micro_batch_size"),
        ("model", "precision", "fp64", "megatron.model.precision"), ("model", "fp8", "e5m2", "megatron.model.fp8"),
        ("model", "layer_spec", "x", "megatron.model.layer_spec"),
    ]
    for section, name, value, where in bad:
        cfg = _stage(train=TrainConfig(micro_batch_size=4))
        target = {None: cfg, "train": cfg.train, "model": cfg.megatron.model}[section]
        setattr(target, name, value)
        with pytest.raises(ConfigError, match=where.replace(".", r"\.")):
            validate_all(cfg)
    with pytest.raises(ConfigError, match="data"):
        validate_all(TrainStageConfig(init_checkpoint="c", output_dir="o"))
    # FP8: TE layer spec and bf16; on a CPU machine the runtime check refuses GPU-only settings by name
    with pytest.raises(ConfigError, match="fp8.*layer spec"):
        validate_all(_stage(megatron=_engine(fp8="hybrid", layer_spec="local")))
    with pytest.raises(ConfigError, match="fp8.*bf16"):
        validate_all(_stage(megatron=_engine(fp8="hybrid", precision="fp32")))
    gpu = _stage(megatron=_engine(fp8="hybrid", layer_spec="te", precision="bf16", fp8_recipe="tensorwise"))
    validate_all(gpu)
    assert gpu.validate_runtime(8, cuda=True) == 8
    # FP8 GEMMs need 16-row multiples per rank: the padding follows (8 -> 16; x TP under sequence parallelism)
    assert batch_pad_multiple(8, gpu.megatron) == 16 and batch_pad_multiple(8, MegatronConfig()) == 8
    sp = _engine(dict(tensor_model_parallel_size=4, sequence_parallel=True), fp8="hybrid", layer_spec="te",
                 precision="bf16")
    assert batch_pad_multiple(8, sp) == 64
    with pytest.raises(ConfigError, match="fp8|bf16"):
        gpu.validate_runtime(1, cuda=False)
    # bf16 without FP8 runs on CPU too (Megatron's bf16 optimizers work under gloo; the CPU suite tests them)
    assert _stage(megatron=_engine(precision="bf16")).validate_runtime(2, cuda=False) == 2
    with pytest.raises(ConfigError, match="does not divide"):
        _stage(megatron=_engine(dict(tensor_model_parallel_size=2))).validate_runtime(3, cuda=False)
    with pytest.raises(ConfigError, match="micro_batch_size x data-parallel"):
        _stage(train=TrainConfig(global_batch_size=6, micro_batch_size=2)).validate_runtime(2, cuda=False)
    with pytest.raises(ConfigError, match="objective.tau"):
        validate_all(_stage(objective=__import__("megatron_inpo.objectives").objectives.ObjectiveConfig(tau=0.01)))
    with pytest.raises(ConfigError, match="megatron.parallel.sequence_parallel: needs tensor_model_parallel_size"):
        validate_all(_stage(megatron=_engine(dict(sequence_parallel=True))))


def test_schedule_lengths():
    cfg = TrainConfig(warmup_ratio=0.03)
    assert cfg.lr_steps(100) == (3, 100)
    assert cfg.lr_steps(1) == (0, 1)
    cfg = TrainConfig(global_batch_size=4, epochs=2)
    assert cfg.total_steps(10) == 4


def test_cli_parses_yaml_overrides_and_flags(tmp_path):
    from megatron_inpo.cli.loader import Command, load_config

    def parse_config(argv, cls, prog, doc):
        return load_config(Command(prog=prog, config=cls, doc=doc), argv)[0]

    y = tmp_path / "s.yaml"
    y.write_text("data: a.jsonl\ninit_checkpoint: ck\noutput_dir: out\nobjective:\n  eta: 0.01\n  tau: 0.002\n")
    cfg = parse_config(["--config", str(y), "train.lr=1e-6", "--train.micro-batch-size", "2", "--objective.name",
                        "inpo_nokl", "--train.global_batch_size=8"], TrainStageConfig, "t", "")
    assert (cfg.train.lr, cfg.train.micro_batch_size, cfg.objective.name, cfg.objective.eta,
            cfg.train.global_batch_size) == (1e-6, 2, "inpo_nokl", 0.01, 8)
    with pytest.raises(ConfigError, match="no config field 'nope'"):
        parse_config(["--config", str(y), "--nope", "1"], TrainStageConfig, "t", "")
    from megatron_inpo.cli.train import main

    assert main(["--config", str(y), "train.lr=-1"]) == 2


def test_half_written_checkpoints_are_never_picked(tmp_path):
    from megatron_inpo.engine.checkpoint import CheckpointError, latest_checkpoint, list_checkpoints, read_meta

    assert latest_checkpoint(tmp_path / "none") is None
    good = tmp_path / "step_00000002"
    good.mkdir()
    (good / "megatron_inpo.json").write_text(json.dumps({"format_version": 1, "hf_config": {}, "padded_vocab_size": 8,
                                                         "tp": 1, "pp": 1}))
    (tmp_path / ".step_00000003.tmp-abcd").mkdir()         # a save cut before the rename
    (tmp_path / "step_00000004").mkdir()                   # a directory without metadata (not ours / cut)
    (tmp_path / "step_00000010.old").mkdir()
    assert latest_checkpoint(tmp_path) == good
    assert [s for s, _ in list_checkpoints(tmp_path)] == [2]
    with pytest.raises(CheckpointError, match="step_00000004: not a megatron-inpo checkpoint"):
        read_meta(tmp_path / "step_00000004")
    (good / "megatron_inpo.json").write_text("{")
    with pytest.raises(CheckpointError, match="invalid JSON"):
        read_meta(good)


def test_cli_errors_name_the_file_and_line_before_starting(tmp_path, capsys):
    from megatron_inpo.cli import logprobs as cli_logprobs
    from megatron_inpo.cli import train as cli

    good = _pair([1], [2], [3], ref_chosen_logp=-1.0, ref_rejected_logp=-1.0, last_chosen_logp=-1.0,
                  last_rejected_logp=-1.0)
    data = tmp_path / "d.jsonl"
    data.write_text(good.to_json() + "\n" + _pair([1], [2], [3]).to_json() + "\n")
    rc = cli.main(["--data", str(data), "--init-checkpoint", str(tmp_path), "--output-dir", str(tmp_path / "o"),
                   "--train.global-batch-size", "1"])
    assert rc == 2 and "d.jsonl:2: log-prob columns missing" in capsys.readouterr().err
    data.write_text(good.to_json() + "\n")
    rc = cli.main(["--data", str(data), "--init-checkpoint", str(tmp_path / "nope"), "--output-dir",
                   str(tmp_path / "o"), "--train.global-batch-size", "1"])
    assert rc == 2 and "nope: not a megatron-inpo checkpoint" in capsys.readouterr().err
    rc = cli_logprobs.main(["--data", str(data), "--output", str(tmp_path / "x.jsonl"), "--ref-checkpoint",
                            str(tmp_path / "nope")])
    assert rc == 2 and "nope: not a megatron-inpo checkpoint" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="output: must differ"):
        validate_all(LogprobStageConfig(data=str(data), output=str(data), ref_checkpoint="r"))
    bad = LogprobStageConfig(data="a", output="b", ref_checkpoint="r")
    bad.logprobs.micro_batch_size = 0
    with pytest.raises(ConfigError, match="logprobs.micro_batch_size"):
        validate_all(bad)
    assert LogprobStageConfig(data="a", output="b", ref_checkpoint="r", last_checkpoint="r").same_models()
    import torch.distributed as dist

    assert not dist.is_initialized()


def test_fused_adam_switch_gives_the_same_updates():
    """fuse_torch_adam turns Megatron's fallback torch AdamW (held as `.optimizer`) to the fused kernel; the
    updates equal the multi-tensor path's within float32 rounding, weight-decay groups included."""
    from types import SimpleNamespace

    from megatron_inpo.engine.optimizer import fuse_torch_adam

    torch.manual_seed(0)
    shapes = [(7, 5), (5,), (3, 4, 2)]
    init = [torch.randn(s) for s in shapes]
    grads = [[torch.randn(s) for s in shapes] for _ in range(4)]

    def run(fused: bool):
        params = [torch.nn.Parameter(t.clone()) for t in init]
        adam = torch.optim.AdamW([{"params": params[:2], "weight_decay": 0.1}, {"params": params[2:],
                                  "weight_decay": 0.0}], lr=1e-2, betas=(0.9, 0.95), eps=1e-8)
        chained = SimpleNamespace(chained_optimizers=[SimpleNamespace(optimizer=adam)])
        if fused:
            assert fuse_torch_adam(chained) == 2
        for step in grads:
            for p, g in zip(params, step):
                p.grad = g.clone()
            adam.step()
        return params, adam

    plain, plain_adam = run(False)
    fused, adam = run(True)
    assert not any(g["fused"] for g in plain_adam.param_groups)
    assert all(g["fused"] and not g["foreach"] for g in adam.param_groups)
    for a, b in zip(plain, fused):
        assert torch.allclose(a, b, rtol=1e-6, atol=1e-7) and not torch.equal(a, torch.zeros_like(a))
    # a stepped optimizer keeps its path: its CPU `step` tensors would not suit the fused kernel on a GPU
    assert fuse_torch_adam(SimpleNamespace(optimizer=torch.optim.AdamW([torch.nn.Parameter(torch.ones(2))]))) == 1
    assert fuse_torch_adam(SimpleNamespace(optimizer=adam)) == 0
