"""Test-only CPU stand-ins that let fairscale 0.4.13's FullyShardedDataParallel (and torch's
DistributedDataParallel as fairseq builds it) run without CUDA, over gloo: the fairseq host's
``--ddp-backend fully_sharded`` / ``pytorch_ddp`` tests (``tests/test_hosts_fsdp_fairseq.py``).

Only a test's subprocess loads this: the test puts this directory first on the subprocess's
``PYTHONPATH``, and Python imports ``sitecustomize`` at start. The package never imports it and
the installed fairscale is not modified. Every stand-in applies only while ``torch.cuda`` is
unavailable, and only once the module it adapts is imported (a post-import hook):

- fairscale FSDP: its three CUDA streams become one no-op stream (all work runs in order on the
  host), stream syncs and ``record_stream`` on CPU tensors are skipped, the compute device of a
  CPU module is the CPU, and the reduce-scatter / all-gather take the list collectives gloo
  accepts (fairscale's own ``ENABLE_NCCL_BASE_COLLECTIVES=0`` switch);
- ``Tensor.cuda()`` returns the tensor (fairscale's and fairseq's gradient-norm code move the
  norm to the GPU unconditionally);
- ``DistributedDataParallel`` of a CPU module drops ``device_ids`` / ``output_device``
  (fairseq's ``pytorch_ddp`` passes them unconditionally; torch refuses them for CPU modules).

The same changes, as a source patch, are what the metaseq CPU build applies to its own copy
(docs/METASEQ.md, "Trying it without a GPU").
"""

from __future__ import annotations

import contextlib
import importlib.abc
import importlib.machinery
import sys
from typing import Any, Callable


class _NoStream:
    """Stands in for a CUDA stream: waits and syncs are no-ops (CPU work runs in order)."""

    def wait_stream(self, stream: Any) -> None:
        pass

    def synchronize(self) -> None:
        pass


NO_STREAM = _NoStream()


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


class _CudaView:
    """``torch.cuda`` as fairscale's FSDP module sees it: streams and syncs are stand-ins."""

    def __init__(self, real: Any) -> None:
        self._real = real

    def __getattr__(self, name: str) -> Any:
        return getattr(self._real, name)

    @staticmethod
    def current_stream(device: Any = None) -> _NoStream:
        return NO_STREAM

    @staticmethod
    def Stream(*args: Any, **kwargs: Any) -> _NoStream:  # noqa: N802 (torch's name)
        return NO_STREAM

    @staticmethod
    def stream(s: Any) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()

    @staticmethod
    def synchronize(device: Any = None) -> None:
        pass


class _TorchView:
    """The ``torch`` module with ``torch.cuda`` replaced by ``_CudaView``."""

    def __init__(self, real: Any) -> None:
        self._real = real
        self.cuda = _CudaView(real.cuda)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._real, name)


def _patch_tensor_methods() -> None:
    import torch

    if getattr(torch.Tensor.record_stream, "_cpu_stand_in", False):
        return
    record_stream = torch.Tensor.record_stream

    def record_stream_stand_in(self: torch.Tensor, stream: Any) -> None:
        if stream is NO_STREAM or not self.is_cuda:
            return None
        return record_stream(self, stream)

    def cuda_stand_in(self: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return self

    record_stream_stand_in._cpu_stand_in = True  # type: ignore[attr-defined]
    torch.Tensor.record_stream = record_stream_stand_in  # type: ignore[method-assign]
    torch.Tensor.cuda = cuda_stand_in  # type: ignore[method-assign]


def _patch_fsdp(module: Any) -> None:
    if _cuda_available():
        return
    import torch

    module.torch = _TorchView(torch)
    module.enable_nccl_base_collectives = False
    module._get_default_cuda_device = lambda m: torch.device("cpu")
    fsdp = module.FullyShardedDataParallel
    setup_streams = fsdp._setup_streams

    def _setup_streams(self: Any) -> None:
        setup_streams(self)
        if self._is_root:  # children share the root's dict object
            for name in ("fp32_to_fp16", "all_gather", "post_backward"):
                self._streams.setdefault(name, NO_STREAM)

    fsdp._setup_streams = _setup_streams
    _patch_tensor_methods()


def _patch_bucketer(module: Any) -> None:
    if not _cuda_available():
        module.enable_nccl_base_collectives = False


def _patch_ddp(distributed: Any) -> None:
    ddp = distributed.DistributedDataParallel
    init = ddp.__init__

    def __init__(self: Any, module: Any, device_ids: Any = None, output_device: Any = None,
                 *args: Any, **kwargs: Any) -> None:
        if not _cuda_available() and all(p.device.type == "cpu" for p in module.parameters()):
            device_ids = output_device = None
        init(self, module, device_ids, output_device, *args, **kwargs)

    ddp.__init__ = __init__


class _AfterImport(importlib.abc.MetaPathFinder):
    """Runs ``patch(module)`` right after the named modules are first executed."""

    def __init__(self, patches: dict[str, Callable[[Any], None]]) -> None:
        self.patches = patches

    def find_spec(self, fullname: str, path: Any, target: Any = None) -> Any:
        patch = self.patches.get(fullname)
        if patch is None:
            return None
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is None or spec.loader is None:
            return spec
        exec_module = spec.loader.exec_module

        def exec_then_patch(module: Any) -> None:
            exec_module(module)
            patch(module)

        spec.loader.exec_module = exec_then_patch  # type: ignore[method-assign]
        return spec


sys.meta_path.insert(0, _AfterImport({
    "fairscale.nn.data_parallel.fully_sharded_data_parallel": _patch_fsdp,
    "fairscale.internal.reduce_scatter_bucketer": _patch_bucketer,
    "torch.nn.parallel.distributed": _patch_ddp,
}))
