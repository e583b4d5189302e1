"""Model options and HF-config validation: clear errors on CPU for the GPU-only paths (TE, FP8)."""
import subprocess
import sys

import pytest
import torch

from megatron_inpo.config import ConfigError
from megatron_inpo.engine.config import MegatronModelConfig
from megatron_inpo.engine.machine import te_available
from megatron_inpo.engine.model import LlamaArch, padded_vocab
from tests.helpers.model import tiny_config

pytestmark = pytest.mark.megatron


def test_engine_import_is_lazy():
    code = ("import sys, megatron_inpo.engine, megatron_inpo.engine.model, megatron_inpo.engine.mapping, "
            "megatron_inpo.cli.convert, megatron_inpo.cli.loader; "
            "print('megatron.core' in sys.modules, 'transformer_engine' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]


def test_padded_vocab():
    assert padded_vocab(250, 1) == 256 and padded_vocab(250, 2) == 256 and padded_vocab(257, 2) == 512
    assert padded_vocab(128256, 8) == 128 * 8 * 126


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU-only expectations")
def test_gpu_only_options_fail_clearly_on_cpu():
    assert not te_available()
    arch = LlamaArch.from_hf(tiny_config())
    MegatronModelConfig().validate(arch)
    assert MegatronModelConfig().resolved_layer_spec() == "local"
    with pytest.raises(ConfigError, match="layer_spec='te' needs CUDA"):
        MegatronModelConfig(layer_spec="te").validate(arch)
    with pytest.raises(ConfigError, match="fp8 needs Transformer Engine"):
        MegatronModelConfig(fp8="hybrid", precision="bf16").validate(arch)
    for field, value, match in (("fp8", "e5m2", "fp8="), ("fp8_recipe", "mxfp9", "fp8_recipe="),
                                ("precision", "fp64", "precision="), ("attention", "flash", "attention=")):
        with pytest.raises(ConfigError, match=match):
            MegatronModelConfig(**{field: value, **({"fp8": "hybrid"} if field == "fp8_recipe" else {})}).validate(arch)


def test_fp8_divisibility_checked(monkeypatch):
    """With TE pretended available, FP8 still rejects dims not divisible by 16 and names the field."""
    import megatron_inpo.engine.machine as M

    monkeypatch.setattr(M, "_te_checked", True)
    arch = LlamaArch.from_hf(tiny_config("gqa_untied_rope", intermediate_size=104))
    with pytest.raises(ConfigError, match="intermediate_size=104 divisible by 16"):
        MegatronModelConfig(fp8="hybrid", precision="bf16", layer_spec="te").validate(arch)
    with pytest.raises(ConfigError, match="precision 'bf16'"):
        MegatronModelConfig(fp8="hybrid", precision="fp32", layer_spec="te").validate(arch)
    ok = LlamaArch.from_hf(tiny_config(num_attention_heads=4))
    MegatronModelConfig(fp8="hybrid", fp8_recipe="current", precision="bf16", layer_spec="te").validate(ok)
    # per tensor-parallel rank: an FFN of 96 splits into 3 x 32 (fine) but 4 x 24 (not a multiple of 16)
    ffn96 = LlamaArch.from_hf(tiny_config(num_attention_heads=4, intermediate_size=96))
    MegatronModelConfig(fp8="hybrid", precision="bf16", layer_spec="te").validate(ffn96, tp=2)
    with pytest.raises(ConfigError, match="intermediate_size / TP = 96 / 4 divisible by 16"):
        MegatronModelConfig(fp8="hybrid", precision="bf16", layer_spec="te").validate(ffn96, tp=4)


def test_hf_config_errors():
    with pytest.raises(ConfigError, match="architectures"):
        LlamaArch.from_hf(tiny_config(architectures=["GPT2LMHeadModel"]))
    with pytest.raises(ConfigError, match="hidden_act"):
        LlamaArch.from_hf(tiny_config(hidden_act="gelu"))
    with pytest.raises(ConfigError, match="rope type 'yarn'"):
        LlamaArch.from_hf(tiny_config(rope_scaling={"rope_type": "yarn", "factor": 2.0}))
    arch = LlamaArch.from_hf(tiny_config())
    with pytest.raises(ConfigError, match="tensor parallel size 4 does not divide config.json num_key_value_heads=2"):
        arch.check_tp(4)
    with pytest.raises(ConfigError, match="pipeline parallel size 3"):
        arch.check_pp(3)
    old = {k: v for k, v in tiny_config().items() if k != "rope_parameters"}
    old.update(rope_theta=500000.0, rope_scaling={"type": "linear", "factor": 2.0})
    r = LlamaArch.from_hf(old).rope
    assert r["rope_type"] == "linear" and r["rope_theta"] == 500000.0


def test_logprob_pass_drops_fp8_unless_asked():
    """The log-prob stage builds its models without FP8 by default (LogprobConfig.fp8's docstring says why), keeps
    every other engine field, and pads to FP8's multiple of 16 only when it does run FP8."""
    from megatron_inpo.engine.config import LogprobConfig, MegatronConfig, batch_pad_multiple

    engine = MegatronConfig()
    engine.model.fp8, engine.model.precision = "hybrid", "bf16"
    plain = LogprobConfig().forward_engine(engine)
    assert plain.model.fp8 == "" and plain.model.precision == "bf16" and plain.parallel == engine.parallel
    assert engine.model.fp8 == "hybrid"  # the training config itself is untouched
    assert batch_pad_multiple(8, plain) == 8
    fp8 = LogprobConfig(fp8=True).forward_engine(engine)
    assert fp8 is engine and batch_pad_multiple(8, fp8) == 16
    engine.model.fp8 = ""
    assert LogprobConfig(fp8=True).forward_engine(engine).model.fp8 == ""
