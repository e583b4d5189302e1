"""torchrun worker (2 processes, gloo) of tests/engine/test_model_parallel.py, launched as
`torchrun ... -m tests.helpers.model_worker` from the repository root: TP=2 and PP=2 logits == transformers, for
the in-memory HF mapping and for converter outputs loaded with dist_checkpointing. Prints one JSON line per check.
argv: OUT_JSON HF_ROOT MC_ROOT NAME...; env MODEL_WORKER_LAYOUTS (default "2x1,1x2"; "2x2" with 4 processes)."""
import json
import os
import sys

import torch

from tests.helpers.model import hf_logits, hf_model, megatron_logits, sample_tokens, tiny_config


def main():
    out_path, hf_root, mc_root, names = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4:]
    from megatron.core import dist_checkpointing

    from megatron_inpo.engine import parallel
    from megatron_inpo.engine.mapping import load_hf_state_dict
    from megatron_inpo.engine.model import build_model

    results = []
    for name in names:
        cfg = tiny_config(name)
        ref = hf_model(cfg)
        tokens = sample_tokens(cfg["vocab_size"], seq=40)
        want = hf_logits(ref, tokens)
        meta = json.load(open(os.path.join(mc_root, name, "megatron_inpo.json")))
        layouts = os.environ.get("MODEL_WORKER_LAYOUTS", "2x1,1x2").split(",")
        for tp, pp in (tuple(int(x) for x in lay.split("x")) for lay in layouts):
            lay = parallel.initialize(tp, pp, seed=11)
            built = build_model(cfg)
            load_hf_state_dict(built.model, ref.state_dict(), cfg)
            err_mem = (megatron_logits(built.model, tokens, cfg["vocab_size"]) - want).abs().max().item()
            built = build_model(cfg, padded_vocab_size=meta["padded_vocab_size"])
            loaded = dist_checkpointing.load({"model": built.model.sharded_state_dict()}, os.path.join(mc_root, name))
            res = built.model.load_state_dict(loaded["model"], strict=False)
            missing = [k for k in res.missing_keys if not k.endswith("_extra_state")]
            err_ckpt = (megatron_logits(built.model, tokens, cfg["vocab_size"]) - want).abs().max().item()
            # save like the engine does (every rank its shard) so the test can export it with mcore-to-hf
            from megatron_inpo.engine.checkpoint import save_to

            save_to(os.path.join(mc_root, f"{name}_saved_{tp}x{pp}"), [built.model],
                    {"hf_config": cfg, "padded_vocab_size": built.padded_vocab_size, "layer_spec": built.layer_spec})
            results.append(dict(name=name, tp=tp, pp=pp, rank=lay.rank, err_mapping=err_mem, err_checkpoint=err_ckpt,
                                missing=missing, ckpt_tp=meta["tp"], ckpt_pp=meta["pp"]))
    parallel.destroy()
    import torch.distributed as dist

    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, results)
    if dist.get_rank() == 0:
        with open(out_path, "w") as f:
            json.dump([r for rs in gathered for r in rs], f)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
