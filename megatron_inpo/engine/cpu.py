"""CPU / gloo mode for Megatron-Core: the few patches that let megatron-core 0.16.1 run on CPU-only torch.

Megatron-Core assumes CUDA in a handful of places. `enable_cpu_mode()` patches exactly those, process-wide, and
is a no-op when CUDA is available (so GPU runs are never touched). It is idempotent and must be called before
models are built or schedules run; `engine.parallel.initialize` calls it for you.

Patches (each names the megatron-core 0.16.1 code that needs it):
  1. `torch.cuda.current_device()` is used as an allocation device (tensor_parallel/mappings.py, layers.py,
     rotary_pos_embedding.py, p2p_communication.py, ...): it returns the CPU device.
  2. `torch.cuda.synchronize()` after batched p2p isend/irecv (pipeline_parallel/p2p_communication.py): no-op.
  3. The model-parallel RNG tracker (tensor_parallel/random.py: _get/_set_cuda_rng_state,
     CudaRNGStatesTracker.add, torch.cuda.manual_seed) keeps CPU generator states instead of CUDA ones, so
     `model_parallel_cuda_manual_seed` and `tracker.fork()` work.
  4. Literal `device="cuda"` tensor factories and `Tensor.cuda()` / `.to("cuda")` (pipeline_parallel/schedules.py,
     transformer/utils.py, ...): a TorchFunctionMode rewrites them to CPU.
  5. `torch.cuda.current_stream()` in the DDP grad-buffer sync (distributed/param_and_grad_buffer.py): a stream
     whose waits are no-ops.
  6. (optimizer) optimizer/clip_grads.py asserts grads are `torch.cuda.FloatTensor` before scaling them: the clip
     is replaced by the same in-place scaling in plain torch.

`prepare_optimizer_params(params)` adds the one per-parameter workaround the distributed optimizer and the
bf16 / fp16 optimizer need (distrib_optimizer.py and Float16OptimizerWithFloat16Params compare `param.type()` with
CUDA type names).
"""
from __future__ import annotations

import torch

_CPU = torch.device("cpu")
_enabled = False
_mode = None


def _is_cuda(d) -> bool:
    if isinstance(d, str):
        return d.startswith("cuda")
    if isinstance(d, torch.device):
        return d.type == "cuda"
    return False


class _NullStream:
    def wait_event(self, *a, **k):
        pass

    def wait_stream(self, *a, **k):
        pass

    def synchronize(self):
        pass

    def record_event(self, *a, **k):
        return None


def _make_device_mode():
    from torch.overrides import TorchFunctionMode

    class CpuDeviceMode(TorchFunctionMode):
        """Rewrites CUDA device arguments to CPU for every torch function call (patch 4)."""

        def __torch_function__(self, func, types, args=(), kwargs=None):
            kwargs = dict(kwargs or {})
            if func is torch.Tensor.cuda:
                return args[0]
            if "device" in kwargs and _is_cuda(kwargs["device"]):
                kwargs["device"] = _CPU
            if func is torch.Tensor.to:
                args = tuple(_CPU if _is_cuda(a) else a for a in args)
            return func(*args, **kwargs)

    return CpuDeviceMode()


def enable_cpu_mode() -> bool:
    """Apply the CPU patches (idempotent). Returns True when the CPU mode is active, False on a CUDA machine."""
    global _enabled, _mode
    if torch.cuda.is_available():
        return False
    if _enabled:
        return True
    import megatron.core.optimizer.optimizer as mopt
    import megatron.core.tensor_parallel.random as mrandom

    # 1, 2, 5
    torch.cuda.current_device = lambda: _CPU
    torch.cuda.synchronize = lambda *a, **k: None
    torch.cuda.current_stream = lambda *a, **k: _NullStream()

    # 3
    def _get_rng_state(*a, **k):
        return torch.get_rng_state()

    def _set_rng_state(state, *a, **k):
        torch.set_rng_state(state)

    def _tracker_add(self, name, seed):
        if seed in self.seeds_:
            raise Exception(f"seed {seed} already exists")
        if name in self.states_:
            raise Exception(f"rng state {name} already exists")
        self._is_initialized = True
        self.seeds_.add(seed)
        self.states_[name] = torch.Generator().manual_seed(seed).get_state()

    mrandom._get_cuda_rng_state = _get_rng_state
    mrandom._set_cuda_rng_state = _set_rng_state
    mrandom.CudaRNGStatesTracker.add = _tracker_add
    torch.cuda.manual_seed = lambda seed: None

    # 4
    _mode = _make_device_mode()
    _mode.__enter__()

    # 6
    def _clip_grad_by_total_norm(parameters, max_norm, total_norm, use_decoupled_grad=False):
        coeff = max_norm / (total_norm + 1.0e-6)
        if coeff >= 1.0:
            return
        if isinstance(parameters, torch.Tensor):
            parameters = [parameters]
        for p in parameters:
            g = getattr(p, "decoupled_grad", None) if use_decoupled_grad else p.grad
            if g is not None:
                g.detach().mul_(coeff)

    mopt.clip_grad_by_total_norm_fp32 = _clip_grad_by_total_norm
    _enabled = True
    return True


def prepare_optimizer_params(params) -> None:
    """On CPU, make `param.type()` report the CUDA type name that megatron's distributed optimizer and its bf16 /
    fp16 optimizer (Float16OptimizerWithFloat16Params) check for.

    `params`: an iterable of parameters, or a model (chunk) / list of chunks. No-op with CUDA.
    """
    if torch.cuda.is_available():
        return
    if isinstance(params, torch.nn.Module):
        params = params.parameters()
    elif isinstance(params, (list, tuple)) and params and isinstance(params[0], torch.nn.Module):
        params = [p for m in params for p in m.parameters()]
    for p in params:
        def _type(*a, _p=p, **k):
            if a or k:
                return torch.Tensor.type(_p, *a, **k)
            return torch.Tensor.type(_p).replace("torch.", "torch.cuda.")

        p.type = _type
