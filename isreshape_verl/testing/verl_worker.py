"""verl's own FSDP actor worker, run on CPU: `compute_log_prob` then `update_actor` with any policy loss.

A test harness. It builds `verl.workers.engine_workers.ActorRolloutRefWorker(role="actor")` from verl's
own Hydra config (`ppo_trainer` with the caller's overrides, by `isreshape_verl.recipe_check.compose`) on a
tiny random Qwen2 saved to a folder, and makes the calls verl's trainer makes for one training step
(`RayPPOTrainer._compute_old_log_prob` and `_update_actor`; the v1 trainers send the same fields):

    1. compute_log_prob(batch)   calculate_entropy=True, compute_loss=False, temperature
    2. update_actor(batch)       old_log_probs, advantages; mini_batch_size = global_batch_size =
                                 ppo_mini_batch_size · rollout.n, epochs, seed, shuffle, compute_loss=True

between them, like the trainer, turning padded batches into verl's no-padding form
(`left_right_2_no_padding`) and the returned log-probs back (`no_padding_2_padding`).

The behaviour policy μ: `old_log_probs = log π_θ₀ + shift`, a fixed per-token perturbation (N(0, σ²),
σ = `BatchSpec.behaviour_noise`), so that r = π_θ/μ ≠ 1 from the first step, as with rollout log-probs
under policy lag (the recipes' `bypass_mode`); without it every loss would be REINFORCE on the first
mini-batch and the identity tests would be vacuous.

Each call to `run_cases` starts fresh processes (verl's platform and the process group are
process-global): one process for `world_size=1`, or one per rank with a gloo process group for data
parallelism, each rank given its contiguous share of the batch as verl's dispatch gives it
(`tensordict_utils.chunk_tensordict`). One process runs several cases in turn, so the ~10 s of imports
are paid once. Per case it returns the weights before and after, the grad norm of each optimizer step
and the worker's metrics.

    from isreshape_verl.testing.verl_worker import is_reshape_overrides, run_cases, save_tiny_model
    model = save_tiny_model("/tmp/tiny_qwen2")
    out = run_cases([{"name": "a", "overrides": is_reshape_overrides(kernel="box")}], model_dir=model)
    out["a"]["grad_norm"], out["a"]["metrics"]["actor/is_reshape/ess"], out["a"]["weights"]

CPU-only settings the harness adds (`cpu_overrides`): `attn_implementation=sdpa`, fp32 FSDP mixed
precision, no torch.compile; and in each process `isreshape_verl.cpu.platform.set_cpu_platform` and
`fsdp1_without_sync_module_states` (below). The harness joins its gloo group itself and builds no
rollout, so it needs none of `isreshape_verl.cpu.activate`'s other steps.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from isreshape_verl.launch.overrides import ACTOR_LOSS_SETTINGS, CPU_MODEL_SETTINGS, MODEL_SETTINGS

IS_RESHAPE_TARGET = "isreshape_verl.config.ISReshapeLossConfig"
ACTOR = "actor_rollout_ref.actor"


@dataclass(frozen=True)
class BatchSpec:
    """Shape and randomness of the hand-made batch (left-padded prompts, right-padded responses)."""

    batch_size: int = 8
    """Sequences in the batch (one prompt each: rollout.n = 1 in the harness defaults)."""
    prompt_len: int = 6
    """Padded prompt length; each prompt has 2..prompt_len tokens."""
    response_len: int = 10
    """Padded response length; each response has 2..response_len tokens."""
    seed: int = 0
    """Seed of token ids, lengths, advantages and the behaviour shift."""
    behaviour_noise: float = 0.3
    """σ of the per-token shift log μ − log π_θ₀ (0: on-policy)."""


@dataclass(frozen=True)
class TinyModel:
    """Shape of the random Qwen2 the worker trains (≈ 85 k parameters, tied embeddings, the 86-token char vocabulary)."""

    hidden_size: int = 64
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 2
    intermediate_size: int = 128
    seed: int = 0


def save_tiny_model(folder: str | os.PathLike, shape: TinyModel = TinyModel()) -> Path:
    """Save a random Qwen2ForCausalLM (fp32) and the sandbox's char-level tokenizer to `folder`.

    The embeddings are tied (as the sandbox's model): verl then loads the checkpoint on every rank, which
    the harness's FSDP1 without `sync_module_states` relies on (see `fsdp1_without_sync_module_states`).
    """
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from isreshape_verl.sandbox.model import build_char_tokenizer

    folder = Path(folder)
    tokenizer = build_char_tokenizer()
    config = Qwen2Config(
        vocab_size=len(tokenizer), hidden_size=shape.hidden_size, num_hidden_layers=shape.num_layers,
        num_attention_heads=shape.num_heads, num_key_value_heads=shape.num_kv_heads,
        intermediate_size=shape.intermediate_size, max_position_embeddings=128, tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, bos_token_id=None,
        torch_dtype="float32",
    )
    torch.manual_seed(shape.seed)
    Qwen2ForCausalLM(config).to(torch.float32).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def is_reshape_overrides(**params) -> list[str]:
    """Hydra overrides selecting `is_reshape`, as the recipes write them, plus `+...policy_loss.KEY=VALUE`."""
    return [f"{ACTOR}.policy_loss._target_={IS_RESHAPE_TARGET}", f"{ACTOR}.policy_loss.loss_mode=is_reshape",
            *(f"+{ACTOR}.policy_loss.{k}={_hydra_value(v)}" for k, v in params.items())]


def verl_loss_overrides(loss_mode: str, **actor_keys) -> list[str]:
    """Hydra overrides selecting one of verl's built-in losses; `actor_keys` are ActorConfig fields
    (clip_ratio_low, clip_ratio_c, tau_pos, ...)."""
    return [f"{ACTOR}.policy_loss.loss_mode={loss_mode}",
            *(f"{ACTOR}.{k}={_hydra_value(v)}" for k, v in actor_keys.items())]


def _hydra_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    return "null" if v is None else repr(v) if isinstance(v, float) else str(v)


def harness_overrides(spec: BatchSpec, micro_batch: int = 2) -> list[str]:
    """The harness's training settings (before a case's own overrides, which win).

    The recipes' actor settings (remove-padding, gradient checkpointing, no KL or entropy loss, entropy
    computed, seq-mean-token-mean), one mini-batch of the whole batch run for two epochs (the second
    step is off-policy through the model's own update as well), and plain SGD without weight decay
    or effective clipping, so that after each step w' = w − lr·g exactly and comparing weights compares
    gradients (AdamW's first step is ≈ lr·sign(g), which hides differences in gradient size).
    """
    return [
        *MODEL_SETTINGS,
        "actor_rollout_ref.rollout.n=1",
        f"actor_rollout_ref.rollout.log_prob_micro_batch_size_per_gpu={micro_batch}",
        f"{ACTOR}.ppo_mini_batch_size={spec.batch_size}",
        f"{ACTOR}.ppo_micro_batch_size_per_gpu={micro_batch}",
        f"{ACTOR}.ppo_epochs=2",
        *ACTOR_LOSS_SETTINGS,
        f"{ACTOR}.loss_agg_mode=seq-mean-token-mean",
        f"{ACTOR}.optim.optimizer=SGD",
        f"{ACTOR}.optim.lr=0.5",
        f"{ACTOR}.optim.weight_decay=0.0",
        f"{ACTOR}.optim.clip_grad=1e6",
    ]


def cpu_overrides(model_dir: str | os.PathLike) -> list[str]:
    """The model folder and what the recipes' DEVICE=cpu gives the actor (`launch.overrides.CPU_MODEL_SETTINGS`)."""
    return [f"actor_rollout_ref.model.path={model_dir}", *CPU_MODEL_SETTINGS]


def make_batch(spec: BatchSpec, vocab_size: int):
    """A padded batch as a rollout leaves it (TensorDict of (B, ·) tensors).

    prompts (B, P) left-padded, responses (B, R) right-padded, input_ids/attention_mask/position_ids
    (B, P + R), response_mask (B, R), advantages (B, R): one GRPO-like value per sequence (alternating
    sign, |A| ∈ [0.2, 1.2]) on its response tokens, and behaviour_shift (B, R): log μ − log π_θ₀.
    """
    from tensordict import TensorDict

    gen = torch.Generator().manual_seed(spec.seed)
    B, P, R = spec.batch_size, spec.prompt_len, spec.response_len
    prompt_lens = torch.randint(2, P + 1, (B,), generator=gen)
    response_lens = torch.randint(2, R + 1, (B,), generator=gen)
    ids = torch.randint(3, vocab_size, (B, P + R), generator=gen)  # 0..2 are pad/eos/unk
    attention = torch.zeros(B, P + R, dtype=torch.long)
    for i in range(B):
        attention[i, P - prompt_lens[i]:P] = 1
        attention[i, P:P + response_lens[i]] = 1
    ids = ids * attention  # pad id 0 outside the sequence
    position_ids = (attention.cumsum(-1) - 1).clamp(min=0)
    response_mask = attention[:, P:].clone()
    sign = torch.tensor([1.0, -1.0]).repeat(B)[:B, None]
    advantages = sign * (0.2 + torch.rand(B, 1, generator=gen)) * response_mask
    shift = spec.behaviour_noise * torch.randn(B, R, generator=gen) * response_mask
    return TensorDict({"prompts": ids[:, :P].clone(), "responses": ids[:, P:].clone(), "input_ids": ids,
                       "attention_mask": attention, "position_ids": position_ids, "response_mask": response_mask,
                       "advantages": advantages, "behaviour_shift": shift}, batch_size=[B])


def _dispatch(td, rank: int, world_size: int):
    """This rank's share of a no-padding batch, as verl's nd-compute dispatch splits it."""
    from verl.utils import tensordict_utils as tu

    return td if world_size == 1 else tu.chunk_tensordict(td, world_size)[rank]


def _plain(value):
    """Metric values (floats, tensors, verl Metric objects, lists of them) as JSON-able floats/lists."""
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if hasattr(value, "value") and not isinstance(value, torch.Tensor):
        return _plain(value.value)
    if isinstance(value, torch.Tensor):
        return value.detach().float().tolist()
    return float(value) if isinstance(value, (int, float)) or hasattr(value, "__float__") else value


def _full_weights(worker) -> dict[str, torch.Tensor]:
    """The actor's full (unsharded) parameters, name → fp32 CPU copy (a collective on every rank).

    Through torch's distributed-checkpoint API, which unshards FSDP1 and FSDP2 alike (verl's own
    `get_per_tensor_param` builds a "cpu:cpu" device string on the CPU platform).
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    state = get_model_state_dict(worker.actor.engine.module, options=StateDictOptions(full_state_dict=True))
    return {name: t.detach().to("cpu", torch.float32).clone() for name, t in state.items()}


def run_case(case: dict, model_dir: str, spec: BatchSpec, rank: int, world_size: int) -> dict:
    """Build the actor worker for one case and run compute_log_prob + update_actor; needs the CPU platform
    and the process group already set up (see `_main`). Returns weights, grad norms and metrics."""
    from verl.utils import tensordict_utils as tu
    from verl.workers.engine_workers import ActorRolloutRefWorker
    from verl.workers.utils.padding import left_right_2_no_padding, no_padding_2_padding

    from isreshape_verl.recipe_check import compose

    overrides = [*case.get("base", harness_overrides(spec)), *case.get("overrides", []), *cpu_overrides(model_dir)]
    config = compose(overrides)
    arr = config.actor_rollout_ref
    started = time.perf_counter()
    worker = ActorRolloutRefWorker(config=arr, role="actor")
    worker.init_model()
    weights_before = _full_weights(worker)
    temperature = arr.rollout.temperature

    full = make_batch(spec, vocab_size=worker.actor.model_config.hf_config.vocab_size)
    if "keep_rows" in case:  # the same sequences without the others (a batch of fewer rows)
        full = full[torch.tensor(case["keep_rows"])]
    full["response_mask"][case.get("mask_rows", [])] = 0  # as rejection sampling or overlong filtering leave them
    shift = full.pop("behaviour_shift")
    advantages = full.pop("advantages")

    # 1. old log-probs (RayPPOTrainer._compute_old_log_prob), then μ = π_θ₀ · exp(shift)
    td = left_right_2_no_padding(full.clone())
    tu.assign_non_tensor(td, calculate_entropy=True, calculate_sum_pi_squared=False, compute_loss=False,
                         temperature=temperature)
    td = _dispatch(td, rank, world_size)
    out = worker.compute_log_prob(td)
    log_probs = no_padding_2_padding(tu.get(out, "log_probs"), td).float()
    share = _dispatch(full.clone(), rank, world_size)
    rows = slice(rank * share.shape[0], (rank + 1) * share.shape[0])
    old_log_probs = (log_probs + shift[rows]) * share["response_mask"]
    for row in case.get("nonfinite_rows", []):  # a behaviour policy that returned NaN log-probs
        if rows.start <= row < rows.stop:
            old_log_probs[row - rows.start] = float("nan")

    # 2. update (RayPPOTrainer._update_actor): this rank's rows of the trainer's batch
    batch = share.clone()
    batch["old_log_probs"], batch["advantages"] = old_log_probs, advantages[rows]
    td = left_right_2_no_padding(batch)
    mini_batch = arr.actor.ppo_mini_batch_size * arr.rollout.n
    tu.assign_non_tensor(td, calculate_entropy=bool(arr.actor.calculate_entropy or arr.actor.entropy_coeff != 0),
                         distillation_use_topk=False, distillation_only=False, global_batch_size=mini_batch,
                         mini_batch_size=mini_batch, epochs=arr.actor.ppo_epochs, seed=arr.actor.data_loader_seed,
                         dataloader_kwargs={"shuffle": arr.actor.shuffle}, compute_loss=True, temperature=temperature)
    out = worker.update_actor(td)
    metrics = {k: _plain(v) for k, v in tu.get(out, "metrics").items()}
    weights = _full_weights(worker)
    seconds = time.perf_counter() - started
    return {"weights_before": weights_before, "weights": weights, "grad_norm": metrics.get("grad_norm"),
            "metrics": metrics, "old_log_probs": old_log_probs, "seconds": seconds}


def fsdp1_without_sync_module_states() -> None:
    """Make verl's FSDP1 engine build its FSDP wrapper with `sync_module_states=False` (a patch of verl,
    for this harness only: the recipes run FSDP2).

    Answers `verl/workers/engine/fsdp/transformer_impl.py:444`, `FSDP(module, ..., sync_module_states=True,
    ...)` with `FSDP` the module-level name of `transformer_impl.py:29` (`from torch.distributed.fsdp
    import FullyShardedDataParallel as FSDP`): the broadcast of rank 0's weights at wrap time, which
    torch's FSDP1 refuses for CPU parameters. Skipping it is only correct when every rank already holds
    the real weights: true when the model ties its word embeddings, for which verl loads the checkpoint
    on every rank instead of initialising ranks > 0 on the meta device (`transformer_impl.py:267`,
    `get_init_weight_context_manager(use_meta_tensor=not ...tie_word_embeddings, ...)`); the harness's
    tiny model does, and its tests check the unsharded weights against the checkpoint on every
    data-parallel layout. Pinned by `tests/test_cpu_upstream_pins.py`; delete it when verl's FSDP1
    engine accepts CPU parameters.
    """
    from torch.distributed.fsdp import FullyShardedDataParallel

    from verl.workers.engine.fsdp import transformer_impl

    class FSDPOnCPU(FullyShardedDataParallel):
        def __init__(self, *args, **kwargs):
            kwargs["sync_module_states"] = False
            super().__init__(*args, **kwargs)

    transformer_impl.FSDP = FSDPOnCPU  # a subclass, so verl's isinstance(module, FSDP) checks still hold


def _main(spec_path: str, out_path: str) -> None:
    """Subprocess entry: the CPU platform and FSDP1 on CPU, the gloo group, every case; rank 0 saves."""
    from isreshape_verl.cpu.platform import set_cpu_platform

    set_cpu_platform()  # before anything imports verl's engine modules (they read the device at import)
    fsdp1_without_sync_module_states()  # imports verl's engine: after the platform
    job = json.loads(Path(spec_path).read_text())
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world_size,
                                         init_method=f"tcp://127.0.0.1:{os.environ['MASTER_PORT']}")
    spec = BatchSpec(**job["batch"])
    results = {}
    for case in job["cases"]:
        try:
            results[case["name"]] = run_case(case, job["model_dir"], spec, rank, world_size)
        except Exception:  # one bad case must not hide the others; the test reports it
            results[case["name"]] = {"error": traceback.format_exc()}
            if world_size > 1:
                raise  # the other rank would wait forever in a collective
    if rank == 0:
        torch.save(results, out_path)
    torch.distributed.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_cases(cases: list[dict], *, model_dir: str | os.PathLike, world_size: int = 1,
              batch: BatchSpec = BatchSpec(), timeout: float = 1800, log_dir: str | os.PathLike | None = None,
              env: dict | None = None) -> dict[str, dict]:
    """Run each case ({"name", "overrides": [hydra overrides]}, optional "base" replacing
    `harness_overrides`) in fresh processes, one per rank; return name → result of `run_case`.
    Optional batch edits, by row of the `BatchSpec` batch: "keep_rows" (train on these rows only), then,
    by row of what is kept, "mask_rows" (response_mask 0) and "nonfinite_rows" (old log-probs NaN).

    Raises RuntimeError with the processes' output when a process fails or `timeout` seconds pass (a hang
    guard: the ~1 min of CPU the tests need can take many times longer on a machine shared with other jobs).
    """
    with tempfile.TemporaryDirectory() as tmp:
        spec_path, out_path = Path(tmp, "job.json"), Path(tmp, "out.pt")
        spec_path.write_text(json.dumps({"cases": cases, "model_dir": str(model_dir), "batch": asdict(batch)}))
        port = _free_port()
        logs = Path(log_dir or tmp)
        procs = []
        for rank in range(world_size):
            proc_env = {**os.environ, **(env or {}), "RANK": str(rank), "WORLD_SIZE": str(world_size),
                        "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
                        "MASTER_PORT": str(port), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
                        "TOKENIZERS_PARALLELISM": "false", "VERL_LOGGING_LEVEL": "WARN"}
            log = open(logs / f"rank{rank}.log", "w")
            procs.append((subprocess.Popen([sys.executable, "-m", "isreshape_verl.testing.verl_worker",
                                            str(spec_path), str(out_path)], env=proc_env, stdout=log,
                                           stderr=subprocess.STDOUT), log))
        deadline = time.monotonic() + timeout
        # poll every rank: when one dies, the others would wait for it in a collective until gloo's timeout
        while any(proc.poll() is None for proc, _ in procs) and time.monotonic() < deadline:
            if any(proc.poll() not in (None, 0) for proc, _ in procs):
                break
            time.sleep(0.2)
        for proc, log in procs:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
            log.close()
        failed = [rank for rank, (proc, _) in enumerate(procs) if proc.returncode != 0]
        if failed:
            tails = "\n".join(f"--- rank {r} ---\n" + (logs / f"rank{r}.log").read_text()[-6000:] for r in failed)
            raise RuntimeError(f"verl worker process(es) {failed} failed or timed out after {timeout:.0f} s:\n{tails}")
        results = torch.load(out_path, weights_only=False)
    errors = {name: r["error"] for name, r in results.items() if "error" in r}
    if errors:
        raise RuntimeError("cases failed:\n" + "\n".join(f"--- {n} ---\n{e}" for n, e in errors.items()))
    return results


if __name__ == "__main__":
    _main(*sys.argv[1:3])
