"""The `isreshape_hf` rollout server on its own (no Ray): exact log-probs, batching, limits, abort, weights.

The server is driven as verl's agent loop drives it, through `await server.generate(prompt_ids,
sampling_params, request_id)`, several requests at once.
"""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import pytest
import torch

from isreshape_verl.cpu.hf_rollout import HFRolloutServer, _filter_top_k_top_p
from isreshape_verl.testing.verl_worker import TinyModel, save_tiny_model

PROMPTS = [[5, 6, 7], [8, 9, 10, 11, 12, 13], [14], [15, 16, 17, 18]]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("model"), TinyModel(seed=3))


def _server(model_dir, response_length=12, seed=0) -> HFRolloutServer:
    config = SimpleNamespace(response_length=response_length, prompt_length=16, max_num_seqs=64,
                             dtype="float32", seed=seed)
    return HFRolloutServer(config, SimpleNamespace(local_path=str(model_dir), path=str(model_dir)))


def _generate(server, prompts, **params):
    async def run():
        return await asyncio.gather(*[server.generate(p, dict(params), f"r{i}") for i, p in enumerate(prompts)])

    return asyncio.run(run())


def _reference_log_probs(model, prompt, tokens, temperature):
    """log softmax(logits / T) of each response token, from one uncached forward over prompt + response."""
    ids = torch.tensor([prompt + tokens])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0, len(prompt) - 1: -1].float()  # (R, V)
    return torch.log_softmax(logits / temperature, -1).gather(-1, torch.tensor(tokens)[:, None])[:, 0]


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_log_probs_are_the_full_temperature_scaled_softmax(model_dir, temperature):
    server = _server(model_dir)
    outputs = _generate(server, PROMPTS, temperature=temperature, max_tokens=12)
    for prompt, out in zip(PROMPTS, outputs):
        assert len(out.log_probs) == len(out.token_ids) >= 1
        expected = _reference_log_probs(server.model, prompt, out.token_ids, temperature)
        torch.testing.assert_close(torch.tensor(out.log_probs), expected, atol=1e-5, rtol=0)
    assert server.stats["batches"] == 1  # the four concurrent requests were decoded together


def test_batched_greedy_equals_one_at_a_time(model_dir):
    server = _server(model_dir)
    together = _generate(server, PROMPTS, temperature=0, max_tokens=10)
    alone = [_generate(server, [p], temperature=0, max_tokens=10)[0] for p in PROMPTS]
    assert [o.token_ids for o in together] == [o.token_ids for o in alone]
    for prompt, out in zip(PROMPTS, together):  # greedy: each token is the argmax of the uncached forward
        ids = torch.tensor([prompt + out.token_ids])
        with torch.no_grad():
            argmax = server.model(input_ids=ids).logits[0, len(prompt) - 1: -1].argmax(-1)
        assert argmax.tolist()[: len(out.token_ids)] == out.token_ids


def test_max_tokens_eos_and_stop_reason(model_dir):
    server = _server(model_dir, response_length=12)
    short = _generate(server, PROMPTS, temperature=1.0, max_tokens=3, ignore_eos=True)
    assert [len(o.token_ids) for o in short] == [3, 3, 3, 3]
    assert {o.stop_reason for o in short} == {"completed"}
    capped = _generate(server, PROMPTS[:1], temperature=1.0, ignore_eos=True)  # no max_tokens: response_length
    assert len(capped[0].token_ids) == 12
    server.eos_ids = {int(capped[0].token_ids[0])}  # make the first greedy-free draw an EOS
    eos_id = capped[0].token_ids[0]
    outs = _generate(server, PROMPTS * 8, temperature=1.0, max_tokens=12)
    for out in outs:  # every answer ends at its first EOS, or at the limit
        assert eos_id not in out.token_ids[:-1]
        assert out.token_ids[-1] == eos_id or len(out.token_ids) == 12


def test_same_seed_same_samples_and_version_tag(model_dir):
    a = _generate(_server(model_dir, seed=1), PROMPTS, temperature=1.0, max_tokens=8)
    b = _generate(_server(model_dir, seed=1), PROMPTS, temperature=1.0, max_tokens=8)
    assert [o.token_ids for o in a] == [o.token_ids for o in b]
    assert {o.extra_fields["global_steps"] for o in a} == {None}


def test_weight_update_changes_the_policy_and_tags_the_version(model_dir):
    server = _server(model_dir)
    before = _generate(server, PROMPTS, temperature=0, max_tokens=6)
    state = {k: v + 0.5 * torch.randn_like(v) for k, v in server.model.state_dict().items()
             if k != "lm_head.weight"}  # tied embeddings: the trainer does not send the output head
    asyncio.run(server.update_weights(state, global_steps=7))
    assert torch.equal(server.model.state_dict()["model.norm.weight"], state["model.norm.weight"])
    after = _generate(server, PROMPTS, temperature=0, max_tokens=6)
    assert [o.token_ids for o in after] != [o.token_ids for o in before]
    assert {o.extra_fields["global_steps"] for o in after} == {7}
    with pytest.raises(ValueError, match="missing"):
        asyncio.run(server.update_weights({"model.norm.weight": state["model.norm.weight"]}))
    with pytest.raises(ValueError, match="unexpected"):
        asyncio.run(server.update_weights({**state, "extra.weight": torch.zeros(1)}))


def test_abort_returns_partial_answers_and_resume_serves_again(model_dir):
    server = _server(model_dir, response_length=4000)
    server.prompt_length = 16

    async def scenario():
        pending = [asyncio.create_task(server.generate(p, {"temperature": 1.0, "max_tokens": 4000,
                                                           "ignore_eos": True}, f"r{i}"))
                   for i, p in enumerate(PROMPTS)]
        while not server._running:
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.2)
        result = await server.abort_all_requests()
        outs = await asyncio.gather(*pending)
        parked = asyncio.create_task(server.generate(PROMPTS[0], {"temperature": 0, "max_tokens": 2}, "late"))
        await asyncio.sleep(0.1)
        assert not parked.done()  # held while paused (a weight sync would happen here)
        await server.resume_generation()
        return result, outs, await parked

    result, outs, late = asyncio.run(scenario())
    assert result["aborted_count"] == 4
    assert {o.stop_reason for o in outs} == {"aborted"}
    assert all(0 < len(o.token_ids) < 4000 and len(o.log_probs) == len(o.token_ids) for o in outs)
    assert late.stop_reason == "completed" and len(late.token_ids) == 2


def test_top_k_top_p_filter():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05], [0.5, 0.3, 0.15, 0.05]]))
    out = _filter_top_k_top_p(logits, torch.tensor([2, -1]), torch.tensor([1.0, 0.7]))
    assert torch.isfinite(out).tolist() == [[True, True, False, False], [True, True, False, False]]
    kept = _filter_top_k_top_p(logits, torch.tensor([-1, -1]), torch.tensor([1.0, 1.0]))
    assert torch.equal(kept, logits)


def test_bad_settings_are_named(model_dir):
    config = SimpleNamespace(response_length=4, prompt_length=4, max_num_seqs=4, dtype="int8", seed=0)
    with pytest.raises(ValueError, match="rollout.dtype='int8'"):
        HFRolloutServer(config, SimpleNamespace(local_path=str(model_dir), path=str(model_dir)))
    server = _server(model_dir)
    with pytest.raises(NotImplementedError, match="repetition penalty"):
        _generate(server, PROMPTS[:1], repetition_penalty=1.2)
