"""`rollout.name=isreshape_hf`: a small Hugging Face rollout engine for verl's server-mode rollout on CPU.

verl 0.9.1 generates through a *server* per rollout replica: its agent loop sends token-in-token-out
requests (`generate(prompt_ids, sampling_params, request_id) -> TokenOutput`) to Ray actors that a
`RolloutReplica` launched, and the trainer pushes new weights to them through a `BaseRollout` adapter.
Only vLLM, SGLang and TensorRT-LLM are registered; this module registers a fourth engine, under a name
that cannot collide with verl's, made of three parts:

    HFRolloutServer   the Ray actor: the model, a request queue, batched decoding with a KV cache
    HFReplica         verl's `RolloutReplica`: launches one server per replica (`launch_servers`)
    HFServerAdapter   verl's `BaseRollout`, inside the trainer's (or checkpoint engine's) worker:
                      `update_weights` hands the trainer's weights to the server

What it computes, per request: tokens sampled from softmax(logits / T) (greedy when T = 0) and, for each
sampled token y_t, log π(y_t | prefix) under that same temperature-scaled softmax, over the full
vocabulary: the quantity verl's actor recomputes (`logits / temperature`, `log_softmax`), so that in
sync mode the rollout's log-probs equal the actor's and the first `actor/ppo_kl` is ≈ 0. Requests that
arrive together are decoded together (left-padded prompts, one KV cache, each row stopping at EOS or at
its own `max_tokens`); requests that arrive during a batch wait for the next one.

Simplified on purpose: static batches (no continuous batching), no prefix cache, fp32 by default, no
multi-modal inputs, `top_k`/`top_p` applied to sampling only (the recipes fix top_k=-1, top_p=1, where
the two agree). Every answer carries `extra_fields["global_steps"]`, the weight version that generated
it; `abort_all_requests` stops a batch between two decoding steps and returns the tokens so far with
`stop_reason="aborted"` (verl's partial-rollout client resumes them after the weight sync).
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from dataclasses import dataclass, field
from typing import Any, Optional

import ray
import torch

from verl.workers.rollout.base import BaseRollout
from verl.workers.rollout.replica import RolloutReplica, TokenOutput
from verl.workers.rollout.utils import ensure_async_iterator

from isreshape_verl.cpu.names import HF_ROLLOUT

logger = logging.getLogger(__name__)

ROLLOUT_NAME = HF_ROLLOUT
"""The `actor_rollout_ref.rollout.name` of this engine."""

BATCH_GATHER_SECONDS = 0.01
"""A batch starts once no request has arrived for this long after the first one queued..."""
BATCH_GATHER_MAX_SECONDS = 0.5
"""...or this long after it, whichever comes first."""


def server_name(replica_rank: int, kind: str = "", suffix: str = "") -> str:
    """Ray actor name of a replica's server (the adapter finds the server by it)."""
    return f"{ROLLOUT_NAME}_server_{kind + '_' if kind else ''}{replica_rank}{suffix}"


@dataclass
class _Request:
    prompt_ids: list[int]
    max_tokens: int
    temperature: float
    top_k: int
    top_p: float
    ignore_eos: bool
    done: asyncio.Future
    token_ids: list[int] = field(default_factory=list)
    log_probs: list[float] = field(default_factory=list)
    stop_reason: Optional[str] = None


def _filter_top_k_top_p(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Logits with -inf outside each row's top-k and nucleus top-p (k ≤ 0 and p ≥ 1 keep everything)."""
    sorted_logits, order = logits.sort(dim=-1, descending=True)  # (B, V)
    rank = torch.arange(logits.shape[-1], device=logits.device).expand_as(logits)  # (B, V)
    drop = (top_k[:, None] > 0) & (rank >= top_k[:, None])
    cum = sorted_logits.softmax(-1).cumsum(-1)
    drop |= (cum - sorted_logits.softmax(-1)) >= top_p[:, None]  # keep the token that crosses p
    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    return torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)


class HFRolloutServer:
    """One replica's generation server (a Ray actor; verl's agent loop calls `generate` on it).

    The model is `AutoModelForCausalLM` from `model_config.local_path` in `rollout.dtype`, eval mode,
    sdpa attention. A background task takes every queued request (up to `rollout.max_num_seqs`) and
    decodes them as one batch in a worker thread, so that control calls (abort, weight update) are
    answered while it runs.
    """

    def __init__(self, config, model_config, replica_rank: int = 0):
        from transformers import AutoModelForCausalLM

        from verl.utils.config import omega_conf_to_dataclass
        from verl.workers.config import HFModelConfig

        config = omega_conf_to_dataclass(config)
        model_config = omega_conf_to_dataclass(model_config, dataclass_type=HFModelConfig)
        self.config = config
        self.replica_rank = replica_rank
        self.response_length = int(config.response_length)
        self.prompt_length = int(config.prompt_length)
        self.max_batch = int(config.max_num_seqs or 256)
        dtype = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
                 "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}.get(str(config.dtype))
        if dtype is None:
            raise ValueError(f"rollout.dtype={config.dtype!r} is not allowed for {ROLLOUT_NAME} "
                             "(float32, bfloat16, float16)")
        path = model_config.local_path or model_config.path
        torch.set_num_threads(os.cpu_count() or 1)
        self.model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation="sdpa").eval()
        generation_eos = getattr(self.model.generation_config, "eos_token_id", None)
        eos = generation_eos if generation_eos is not None else self.model.config.eos_token_id
        self.eos_ids = set(eos if isinstance(eos, (list, tuple)) else [eos]) - {None}
        pad = self.model.config.pad_token_id
        self.pad_id = pad if pad is not None else min(self.eos_ids, default=0)
        self.generator = torch.Generator().manual_seed(int(config.seed) + replica_rank)
        self.global_steps: Optional[int] = None
        self._queue: list[_Request] = []
        self._wake: Optional[asyncio.Event] = None
        self._loop: Optional[asyncio.AbstractEventLoop] = None
        self._loop_task: Optional[asyncio.Task] = None
        self._batch_lock: Optional[asyncio.Lock] = None
        self._running: list[_Request] = []
        self._abort = False  # read by the decoding thread between two steps
        self._paused = False
        self._rejecting = False
        self._resumed: Optional[asyncio.Event] = None
        self.stats = {"batches": 0, "requests": 0, "tokens": 0, "seconds": 0.0, "weight_updates": 0,
                      "weight_update_seconds": 0.0}

    # ---- lifecycle -----------------------------------------------------------------------------
    async def ready(self) -> int:
        """Start the batching task; returns the model's parameter count."""
        self._ensure_loop()
        return sum(p.numel() for p in self.model.parameters())

    def _ensure_loop(self) -> None:
        """Start the batching task on the running event loop (once per loop: a Ray actor has one)."""
        loop = asyncio.get_running_loop()
        if self._loop is not loop:
            self._loop = loop
            self._wake, self._batch_lock, self._resumed = asyncio.Event(), asyncio.Lock(), asyncio.Event()
            self._resumed.set()
            self._loop_task = loop.create_task(self._batch_loop())

    async def get_stats(self) -> dict:
        return dict(self.stats)

    # ---- generation ----------------------------------------------------------------------------
    async def generate(self, prompt_ids: list[int], sampling_params: dict[str, Any], request_id: str,
                       image_data=None, video_data=None, **kwargs) -> TokenOutput:
        """Token-in-token-out generation (verl's server interface): tokens, their log-probs, stop reason."""
        self._ensure_loop()
        if image_data is not None or video_data is not None or kwargs.get("audio_data") is not None:
            raise NotImplementedError(f"{ROLLOUT_NAME} generates from text token ids only")
        params = dict(sampling_params)
        if float(params.pop("repetition_penalty", 1.0)) != 1.0:
            raise NotImplementedError(f"{ROLLOUT_NAME} does not apply a repetition penalty (use 1.0)")
        prompt_ids = [int(t) for t in prompt_ids]
        room = self.prompt_length + self.response_length - len(prompt_ids)  # the sequence budget, as vLLM's server
        requested = params.pop("max_tokens", params.pop("max_new_tokens", None))
        max_tokens = max(1, min(self.response_length if requested is None else int(requested), room))
        temperature = float(params.get("temperature", 1.0))
        top_k = int(params.get("top_k", -1) or -1)
        top_p = float(params.get("top_p", 1.0))
        while self._paused:  # a weight sync is in progress: wait for it (or refuse, as asked)
            if self._rejecting:
                return self._output([], [], "aborted")
            await self._resumed.wait()
        request = _Request(prompt_ids, max_tokens, temperature, top_k, top_p,
                           bool(params.get("ignore_eos", False)), asyncio.get_running_loop().create_future())
        self._queue.append(request)
        self._wake.set()
        await request.done
        return self._output(request.token_ids, request.log_probs, request.stop_reason)

    def _output(self, token_ids, log_probs, stop_reason) -> TokenOutput:
        return TokenOutput(token_ids=list(token_ids), log_probs=list(log_probs), stop_reason=stop_reason,
                           num_preempted=0, extra_fields={"global_steps": self.global_steps})

    async def _batch_loop(self) -> None:
        while True:
            await self._wake.wait()
            # let requests sent together arrive together: wait until the queue stops growing (bounded)
            deadline, seen = time.monotonic() + BATCH_GATHER_MAX_SECONDS, -1
            while len(self._queue) != seen and time.monotonic() < deadline:
                seen = len(self._queue)
                await asyncio.sleep(BATCH_GATHER_SECONDS)
            self._wake.clear()
            async with self._batch_lock:
                batch, self._queue = self._queue[: self.max_batch], self._queue[self.max_batch:]
                if self._queue:
                    self._wake.set()
                if not batch:
                    continue
                self._running = batch
                started = time.perf_counter()
                try:
                    await asyncio.to_thread(self._decode, batch)
                except Exception as err:  # fail the requests, keep the server alive
                    logger.exception("batch failed")
                    for request in batch:
                        if not request.done.done():
                            request.done.set_exception(err)
                finally:
                    self._running = []
                self.stats["batches"] += 1
                self.stats["requests"] += len(batch)
                self.stats["tokens"] += sum(len(r.token_ids) for r in batch)
                self.stats["seconds"] += time.perf_counter() - started
                for request in batch:
                    if not request.done.done():
                        request.done.set_result(None)

    @torch.no_grad()
    def _decode(self, batch: list[_Request]) -> None:
        """Decode `batch` to completion (or abort): fills each request's tokens, log-probs, stop reason."""
        device = next(self.model.parameters()).device
        width = max(len(r.prompt_ids) for r in batch)
        input_ids = torch.full((len(batch), width), self.pad_id, dtype=torch.long)  # (B, P) left-padded
        mask = torch.zeros((len(batch), width), dtype=torch.long)  # (B, P)
        for i, r in enumerate(batch):
            input_ids[i, width - len(r.prompt_ids):] = torch.tensor(r.prompt_ids)
            mask[i, width - len(r.prompt_ids):] = 1
        input_ids, mask = input_ids.to(device), mask.to(device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)  # (B, P): pads do not advance positions
        temperature = torch.tensor([r.temperature for r in batch], device=device)  # (B,)
        greedy = temperature <= 0
        scale = torch.where(greedy, torch.ones_like(temperature), temperature)[:, None]  # (B, 1)
        top_k = torch.tensor([r.top_k for r in batch], device=device)
        top_p = torch.tensor([r.top_p for r in batch], device=device)
        filtered = bool(((top_k > 0) | (top_p < 1)).any())
        eos = torch.tensor(sorted(self.eos_ids), dtype=torch.long, device=device)
        ignore_eos = torch.tensor([r.ignore_eos for r in batch], device=device)
        limits = torch.tensor([r.max_tokens for r in batch], device=device)
        active = torch.ones(len(batch), dtype=torch.bool, device=device)

        out = self.model(input_ids=input_ids, attention_mask=mask, position_ids=positions, use_cache=True)
        past, logits = out.past_key_values, out.logits[:, -1].float()  # (B, V)
        step_tokens, step_log_probs = [], []  # one (B,) tensor per step; read back once at the end
        lengths = torch.zeros(len(batch), dtype=torch.long, device=device)  # (B,) tokens each row keeps
        for step in range(int(limits.max())):
            if self._abort:
                break
            log_probs = torch.log_softmax(logits / scale, dim=-1)  # (B, V): what the actor recomputes
            sample_logits = _filter_top_k_top_p(logits / scale, top_k, top_p) if filtered else logits / scale
            sampled = torch.multinomial(sample_logits.softmax(-1), 1, generator=self.generator)[:, 0]  # (B,)
            tokens = torch.where(greedy, logits.argmax(-1), sampled)  # (B,)
            step_tokens.append(tokens)
            step_log_probs.append(log_probs.gather(-1, tokens[:, None])[:, 0])
            lengths += active.long()
            active &= ~((torch.isin(tokens, eos) & ~ignore_eos) | (step + 1 >= limits))
            if not bool(active.any()):
                break
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
            positions = positions[:, -1:] + 1
            out = self.model(input_ids=tokens[:, None], attention_mask=mask, position_ids=positions,
                             past_key_values=past, use_cache=True)
            past, logits = out.past_key_values, out.logits[:, -1].float()
        if not step_tokens:
            step_tokens = step_log_probs = [torch.zeros(len(batch), device=device)]
        tokens_rows = torch.stack(step_tokens, 1).long().tolist()  # (B, steps)
        log_prob_rows = torch.stack(step_log_probs, 1).tolist()
        for request, row_tokens, row_log_probs, length, running in zip(
                batch, tokens_rows, log_prob_rows, lengths.tolist(), active.tolist()):
            request.token_ids, request.log_probs = row_tokens[:length], row_log_probs[:length]
            request.stop_reason = "aborted" if running else "completed"  # still running: stopped by an abort

    # ---- control (verl's replica and trainer call these) ------------------------------------------
    async def abort_all_requests(self, reset_prefix_cache: bool = True, reject_request: bool = False) -> dict:
        """Stop the running batch between two steps (its requests return their tokens so far, "aborted"),
        fail queued ones as "aborted", and hold new ones until `resume_generation`."""
        self._ensure_loop()
        self._paused, self._rejecting = True, reject_request
        self._resumed.clear()
        queued, self._queue = self._queue, []
        for request in queued:
            request.stop_reason = "aborted"
            request.done.set_result(None)
        running = len(self._running)
        self._abort = True
        async with self._batch_lock:  # the running batch has returned
            self._abort = False
        return {"aborted_count": running + len(queued), "request_ids": []}

    async def resume_generation(self) -> None:
        self._ensure_loop()
        self._paused = self._rejecting = False
        self._resumed.set()

    resume_engine_generation = resume_generation

    async def open_submission_gate(self) -> None:
        await self.resume_generation()

    async def abort_request(self, request_id: str, reset_prefix_cache: bool = True) -> dict:
        return {"aborted": False, "request_id": request_id, "error": f"{ROLLOUT_NAME} aborts whole batches only"}

    async def update_weights(self, state: dict[str, torch.Tensor], global_steps: Optional[int] = None) -> float:
        """Load the trainer's weights (HF names, full tensors) between two batches; returns the seconds taken.

        Every parameter of the model must be given, except a tied output embedding."""
        self._ensure_loop()
        started = time.perf_counter()
        async with self._batch_lock:
            missing, unexpected = self.model.load_state_dict(state, strict=False)
            tied = {"lm_head.weight"} if self.model.config.tie_word_embeddings else set()
            if unexpected or set(missing) - tied:
                raise ValueError(f"weight update does not match the rollout model: missing "
                                 f"{sorted(set(missing) - tied)[:5]}, unexpected {sorted(unexpected)[:5]}")
            if global_steps is not None:
                self.global_steps = global_steps
        seconds = time.perf_counter() - started
        self.stats["weight_updates"] += 1
        self.stats["weight_update_seconds"] += seconds
        return seconds

    async def set_global_steps(self, global_steps: int) -> None:
        self.global_steps = global_steps

    async def wait_for_requests_to_drain(self) -> None:
        while self._queue or self._running:
            await asyncio.sleep(0.01)

    # Device memory hooks: nothing to release or restore on the host (the recipes set free_cache_engine=False).
    async def wake_up(self, tags: Optional[list[str]] = None) -> None:
        pass

    async def sleep(self) -> None:
        pass

    async def clear_kv_cache(self) -> None:
        pass  # the KV cache lives only for one batch

    release_kv_cache = resume_kv_cache = clear_kv_cache

    async def start_profile(self, **kwargs) -> None:
        pass

    async def stop_profile(self) -> None:
        pass


class HFReplica(RolloutReplica):
    """verl's `RolloutReplica` for `isreshape_hf`: one `HFRolloutServer` actor per replica.

    The server holds no accelerator (Ray `num_cpus=0`): in hybrid mode (sync, colocate_async) it shares
    the host with the training worker, in standalone mode (separate_async) with the replica's
    checkpoint-engine worker, which holds the replica's logical GPU. It is placed on the node of the
    replica's first worker."""

    async def launch_servers(self):
        kind = "reward" if self.is_reward_model else "teacher" if self.is_teacher_model else ""
        name = server_name(self.replica_rank, kind, self.name_suffix)
        options = {"name": name, "num_cpus": 0, "max_concurrency": self.max_concurrency}
        if self.workers:
            node_id = await self.workers[0].__ray_call__.remote(lambda _: ray.get_runtime_context().get_node_id())
            options["scheduling_strategy"] = ray.util.scheduling_strategies.NodeAffinitySchedulingStrategy(
                node_id=node_id, soft=False)
        server = ray.remote(HFRolloutServer).options(**options).remote(
            config=self.config, model_config=self.model_config, replica_rank=self.replica_rank)
        await server.ready.remote()
        self.servers = [server]
        self._server_handle = server
        self._server_address = name  # a unique key for verl's load balancer; there is no HTTP endpoint


class HFServerAdapter(BaseRollout):
    """verl's `BaseRollout` for `isreshape_hf`, in the worker that owns the replica's weights.

    `update_weights` consumes the trainer's (name, full tensor) stream on every rank (FSDP gathers are
    collectives) and, on the replica's leader rank, sends the tensors to the server through Ray's object
    store in one call."""

    def __init__(self, config, model_config, device_mesh, replica_rank: int = -1):
        super().__init__(config, model_config, device_mesh)
        rank = int(os.environ.get("RANK", 0))
        world = (self.config.tensor_model_parallel_size * self.config.data_parallel_size
                 * self.config.pipeline_model_parallel_size)
        self.replica_rank = rank // world if replica_rank == -1 else replica_rank
        self.rollout_rank = rank % world
        self.is_leader_rank = self.rollout_rank == 0
        self._server = None

    def _server_handle(self):
        if self._server is None:
            self._server = ray.get_actor(server_name(self.replica_rank))
        return self._server

    async def resume(self, tags: list[str]):
        pass  # nothing was released (see HFRolloutServer.sleep)

    async def release(self):
        pass

    @torch.no_grad()
    async def update_weights(self, weights, global_steps: Optional[int] = None, wire_format: str = "named_tensors",
                             **kwargs):
        if wire_format != "named_tensors":
            raise NotImplementedError(f"{ROLLOUT_NAME} takes full tensors (wire_format='named_tensors'), "
                                      f"not {wire_format!r}")
        state = {}
        async for name, tensor in ensure_async_iterator(weights):
            if self.is_leader_rank:
                state[name] = tensor.detach().to("cpu", copy=True)
        if self.is_leader_rank:
            await self._server_handle().update_weights.remote(state, global_steps)
