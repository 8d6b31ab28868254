"""`isreshape_verl.launch.diagnose`: one line for a failed verl run, and the checks before a launch or a resume.

The logs under tests/fixtures/verl_logs/ are excerpts of real train.logs of `bash recipes/tiny/grpo.sh` (verl 0.9.1
on CPU, Ray 2.x, torch 2.13), each made by causing the failure for real; a `# [fixture: N lines of the run left
out]` line marks a cut, everything else is verbatim (Ray's colour codes included):

    disk_full.log           RUN_ROOT on a 3 MiB tmpfs, SAVE_FREQ=1: torch.save of the optimizer fails
    damaged_checkpoint.log  global_step_1/actor/model_world_size_1_rank_0.pt truncated to 1,000,000 bytes, rerun
    worker_killed.log       kill -9 of the run's ray::WorkerDict process during step 1
    ray_oom.log             RAY_memory_usage_threshold=0.01: Ray's memory monitor kills a worker
    node_killed.log         a NNODES=2 run on the local two-node cluster (recipes/cluster/local_ray.sh), kill -9 of every
                            process of node 127.0.0.3 during step 2 (`local_ray.sh kill-node`)
    hub_offline.log         MODEL=Qwen/Qwen2.5-0.5B-Instruct with no network (fails after ~80 s)
    no_nccl.log             a CPU run whose device patches were not loaded: an error none of the above knows
"""

from __future__ import annotations

import json
import struct
import time
from pathlib import Path

import pytest
import torch

from isreshape_verl.launch import diagnose
from isreshape_verl.launch.diagnose import checkpoint_problem, failure_line, model_problem

LOGS = Path(__file__).parent / "fixtures" / "verl_logs"
RUN = Path("/runs/tiny-grpo")


def log(name: str) -> str:
    return (LOGS / f"{name}.log").read_text(encoding="utf-8")


# ---- failure_line on real logs ----
def test_disk_full_names_the_file_torch_was_writing():
    assert failure_line(log("disk_full"), RUN) == (
        "disk full: cannot write /tmp/diag/tmpfs/full/checkpoints/global_step_1/actor/optim_world_size_*_rank_*.pt "
        "(RuntimeError: [enforce fail at inline_container.cc:672] . unexpected pos 510976 vs 510868): free space "
        "there, or set RUN_ROOT to a file system with room; see /runs/tiny-grpo/train.log")


def test_disk_full_of_another_writer_names_its_path():
    text = "Traceback (most recent call last):\nOSError: [Errno 28] No space left on device: '/runs/x/metrics.jsonl'\n"
    assert failure_line(text, RUN) == (
        "disk full: cannot write /runs/x/metrics.jsonl (OSError: [Errno 28] No space left on device: "
        "'/runs/x/metrics.jsonl'): free space there, or set RUN_ROOT to a file system with room; "
        "see /runs/tiny-grpo/train.log")


def test_damaged_checkpoint_gone_from_disk_is_named_from_the_traceback(tmp_path):
    text = log("damaged_checkpoint").replace("/tmp/diag/runs/ckpt", str(tmp_path / "gone"))
    ckpt = tmp_path / "gone" / "checkpoints"
    assert failure_line(text, RUN) == (
        f"checkpoint {ckpt}/global_step_1/actor/model_world_size_*_rank_*.pt is damaged (PytorchStreamReader failed "
        f"reading zip archive: failed finding central directory): remove {ckpt}/global_step_1 and write an earlier "
        f"step into {ckpt}/latest_checkpointed_iteration.txt to resume from it, or start a new EXP_NAME; "
        "see /runs/tiny-grpo/train.log")


def test_damaged_checkpoint_on_disk_is_named_exactly(tmp_path):
    ckpt = tmp_path / "run" / "checkpoints"
    save_step(ckpt, 1)
    truncate(ckpt / "global_step_1/actor/model_world_size_1_rank_0.pt", 1000)
    text = log("damaged_checkpoint").replace("/tmp/diag/runs/ckpt", str(tmp_path / "run"))
    assert failure_line(text, RUN) == (
        f"checkpoint {ckpt}/global_step_1/actor/model_world_size_1_rank_0.pt is damaged (1000 bytes, its zip "
        f"directory does not open: File is not a zip file): remove {ckpt} to start over, or start a new EXP_NAME; "
        "see /runs/tiny-grpo/train.log")


def test_damaged_dataloader_state_is_named_from_its_load_line():
    text = ("(TaskRunnerV1 pid=7) INFO:2026-12-07 11:46:19,056:Resuming from /r/checkpoints/global_step_30, setting "
            "global step to 30\n"
            "    dataloader_state_dict = torch.load(dataloader_local_path, weights_only=False)\n"
            "RuntimeError: PytorchStreamReader failed reading zip archive: failed finding central directory. This "
            "is an internal miniz error.\n")
    assert failure_line(text, RUN) == (
        "checkpoint /r/checkpoints/global_step_30/data.pt is damaged (PytorchStreamReader failed reading zip "
        "archive: failed finding central directory): remove /r/checkpoints/global_step_30 and write an earlier step "
        "into /r/checkpoints/latest_checkpointed_iteration.txt to resume from it, or start a new EXP_NAME; "
        "see /runs/tiny-grpo/train.log")


def test_killed_worker_names_the_actor_and_pid():
    killed = ("a Ray worker died (WorkerDict, pid 24381): Worker unexpectedly exits with a connection error code 2. "
              "End of file; it was killed (kill -9, or the OS's OOM killer: see dmesg) or it crashed; "
              "see /runs/tiny-grpo/train.log")
    text = log("worker_killed")
    assert failure_line(text, RUN) == killed
    raylet_only = text[: text.index("Error executing job")]  # the raylet's line, before the driver's traceback
    assert failure_line(raylet_only, RUN) == killed.replace("WorkerDict, ", "")


def test_a_node_gone_is_told_as_such_not_by_the_call_that_reached_it():
    """The raylet of the killed node ends; verl stops on the TaskRunner it ran there (ActorUnavailableError)."""
    assert failure_line(log("node_killed"), RUN) == (
        "a node of the Ray cluster died under the run (a raylet was terminated unexpectedly: kill -9, the OS's OOM "
        "killer, or the machine went down): verl stopped with ray.exceptions.ActorUnavailableError; rerun the same "
        "command to resume from the last checkpoint once the cluster has its nodes again; "
        "see /runs/tiny-grpo/train.log")


def test_ray_memory_monitor_kill_is_out_of_memory():
    assert failure_line(log("ray_oom"), RUN) == (
        "out of memory: Ray's memory monitor killed TaskRunnerV1.__init__ (pid 27168), node memory 1.90GB used / "
        "23.54GB limit over its threshold 2.0%; free memory there, or use smaller batches; "
        "see /runs/tiny-grpo/train.log")
    older_ray = (  # the format of Ray 2.4x's memory monitor, as verl users post it
        "ray.exceptions.OutOfMemoryError: Task was killed due to the node running low on memory.\n"
        "Memory on the node (IP: 10.0.0.7, ID: db89) where the lease (lease ID: 0100, name=1HsG1ZWorkerDict_0:0:"
        "WorkerDict.__init__, pid=4242, memory used=49.21GB) was running was 120.5GB / 125.8GB (0.957867), which "
        "exceeds the memory usage threshold of 0.95. Ray killed this worker (ID: a4f5) because it was the most "
        "recently scheduled task; to see more information about memory usage on this node, use `ray logs`.\n")
    assert failure_line(older_ray, RUN) == (
        "out of memory: Ray's memory monitor killed WorkerDict.__init__ (pid 4242), node memory 120.5GB / 125.8GB "
        "over its threshold 0.95; free memory there, or use smaller batches; see /runs/tiny-grpo/train.log")


def test_hub_model_without_network_says_cannot_download():
    assert failure_line(log("hub_offline"), RUN) == (
        "cannot download MODEL=Qwen/Qwen2.5-0.5B-Instruct (OSError: We couldn't connect to 'https://huggingface.co' "
        "to load the files, and couldn't find them in the cached files.): download it first (`hf download "
        "Qwen/Qwen2.5-0.5B-Instruct`) or point MODEL at a local folder; see /runs/tiny-grpo/train.log")


def test_hub_model_the_hub_does_not_have():
    text = ("Error executing job with overrides: ['data.seed=42', 'actor_rollout_ref.model.path=Qwen/Qwen9-Typo']\n"
            "OSError: Qwen/Qwen9-Typo is not a local folder and is not a valid model identifier listed on "
            "'https://huggingface.co/models'\n")
    assert failure_line(text, RUN) == (
        "cannot download MODEL=Qwen/Qwen9-Typo (OSError: Qwen/Qwen9-Typo is not a local folder and is not a valid "
        "model identifier listed on 'https://huggingface.co/models'): download it first (`hf download "
        "Qwen/Qwen9-Typo`) or point MODEL at a local folder; see /runs/tiny-grpo/train.log")


def test_anything_else_is_the_last_exception_line():
    assert failure_line(log("no_nccl"), RUN) == (
        "RuntimeError: Distributed package doesn't have NCCL built in; see /runs/tiny-grpo/train.log")


def test_an_actor_whose_creation_raised_is_told_by_its_error_not_as_killed():
    """ActorDiedError "died because of an error raised in its creation task" (a real run whose rollout server
    failed to import) is the ImportError, not a kill."""
    assert failure_line(log("actor_creation_error"), RUN) == (
        "ImportError: cannot import name 'ROLLOUT_NAME' from partially initialized module "
        "'isreshape_verl.cpu.hf_rollout' (most likely due to a circular import) "
        "(/work/main/isreshape_verl/cpu/hf_rollout.py); see /runs/tiny-grpo/train.log")


def test_last_exception_unwraps_ray_and_keeps_one_line():
    text = ("ray.exceptions.RayTaskError(ValueError): \x1b[36mray::TaskRunnerV1.run()\x1b[39m (pid=1)\n"
            "(TaskRunnerV1 pid=7) ValueError: bad " + "x" * 1000 + "\n   second line\n")
    line = failure_line(text, RUN)
    assert line.startswith("ValueError: bad xxx") and line.endswith("…; see /runs/tiny-grpo/train.log")
    assert "\n" not in line and len(line) < diagnose.MAX_LINE + 60
    assert failure_line("ray.exceptions.RayTaskError(KeyError): ray::X.run() (pid=3)\n", RUN) == (
        "KeyError: ray::X.run() (pid=3); see /runs/tiny-grpo/train.log")


def test_a_log_without_an_exception_still_points_at_train_log():
    assert failure_line("step:1 - loss:0.1\n", RUN) == (
        "verl exited without an exception in its output; see /runs/tiny-grpo/train.log")


@pytest.mark.parametrize("name", sorted(p.stem for p in LOGS.glob("*.log")))
def test_every_fixture_gives_one_line(name):
    line = failure_line(log(name), RUN)
    assert "\n" not in line and line.endswith("see /runs/tiny-grpo/train.log")


# ---- checkpoint_problem on small synthetic checkpoints ----
def save_step(ckpt: Path, step: int, world: int = 1, tracker: bool = True) -> Path:
    """A global_step_<step> folder laid out as verl 0.9.1's FSDP checkpoint manager writes it, tiny tensors."""
    actor = ckpt / f"global_step_{step}" / "actor"
    (actor / "huggingface").mkdir(parents=True)
    for rank in range(world):
        for kind in ("model", "optim", "extra_state"):
            torch.save({"w": torch.ones(4) * step}, actor / f"{kind}_world_size_{world}_rank_{rank}.pt")
    (actor / "fsdp_config.json").write_text(json.dumps({"FSDP_version": 2, "world_size": world}))
    (actor / "huggingface" / "config.json").write_text("{}")
    torch.save({"epoch": 0}, ckpt / f"global_step_{step}" / "data.pt")
    if tracker:
        (ckpt / diagnose.TRACKER).write_text(str(step))
    return ckpt / f"global_step_{step}"


def truncate(path: Path, size: int) -> None:
    with open(path, "r+b") as f:
        f.truncate(size)


def test_no_checkpoints_or_no_tracker_is_no_problem(tmp_path):
    assert checkpoint_problem(tmp_path / "absent") is None
    save_step(tmp_path, 1, tracker=False)  # verl trains from scratch without a tracker
    assert checkpoint_problem(tmp_path) is None


def test_whole_steps_are_no_problem(tmp_path):
    save_step(tmp_path, 1)
    save_step(tmp_path, 2, world=2)
    assert checkpoint_problem(tmp_path) is None


def test_truncated_file_goes_back_to_the_previous_whole_step(tmp_path):
    save_step(tmp_path, 5)
    step = save_step(tmp_path, 10)
    truncate(step / "actor/model_world_size_1_rank_0.pt", 100)
    assert checkpoint_problem(tmp_path) == (
        f"checkpoint {step}/actor/model_world_size_1_rank_0.pt is damaged (100 bytes, its zip directory does not "
        f"open: File is not a zip file): remove {step} and write 5 into {tmp_path}/latest_checkpointed_iteration.txt "
        "to resume from global_step_5, or start a new EXP_NAME")


def test_damaged_earlier_step_is_skipped_and_none_left_means_start_over(tmp_path):
    save_step(tmp_path, 1)
    truncate(tmp_path / "global_step_1/data.pt", 10)
    step = save_step(tmp_path, 2)
    (step / "data.pt").write_bytes(b"")
    assert checkpoint_problem(tmp_path) == (
        f"checkpoint {step}/data.pt is damaged (empty file): remove {tmp_path} to start over, or start a new EXP_NAME")


def test_newer_step_than_the_tracker_is_not_read_by_verl(tmp_path):
    save_step(tmp_path, 1)
    crashed = save_step(tmp_path, 2, tracker=False)  # a crash while saving step 2: the tracker still says 1
    truncate(crashed / "actor/optim_world_size_1_rank_0.pt", 10)
    assert checkpoint_problem(tmp_path) is None


def test_missing_rank_and_missing_file(tmp_path):
    step = save_step(tmp_path, 1, world=2)
    (step / "actor/optim_world_size_2_rank_1.pt").unlink()
    assert checkpoint_problem(tmp_path) == (
        f"checkpoint {step}/actor/optim_world_size_2_rank_1.pt is missing (1 of 2 ranks saved): remove {tmp_path} "
        "to start over, or start a new EXP_NAME")
    save_step(tmp_path / "b", 1)
    later = save_step(tmp_path / "b", 2)
    (later / "data.pt").unlink()
    assert checkpoint_problem(tmp_path / "b") == (
        f"checkpoint {later}/data.pt is missing (global_step_1 has it): remove {later} and write 1 into "
        f"{tmp_path}/b/latest_checkpointed_iteration.txt to resume from global_step_1, or start a new EXP_NAME")


def test_tracker_naming_a_missing_folder_or_no_number(tmp_path):
    save_step(tmp_path, 1)
    (tmp_path / diagnose.TRACKER).write_text("2")
    assert checkpoint_problem(tmp_path) == (
        f"checkpoint tracker {tmp_path}/latest_checkpointed_iteration.txt names global_step_2, which is missing, so "
        f"verl would silently train from step 0: write 1 into {tmp_path}/latest_checkpointed_iteration.txt to "
        "resume from global_step_1, or start a new EXP_NAME")
    (tmp_path / diagnose.TRACKER).write_text("")  # verl's int('') raises
    assert checkpoint_problem(tmp_path) == (
        f"checkpoint tracker {tmp_path}/latest_checkpointed_iteration.txt reads b'', not a step number, so verl "
        "cannot resume: write the last complete step into it, or start a new EXP_NAME")


def test_safetensors_and_json_framing(tmp_path):
    from safetensors.torch import save_file

    good = tmp_path / "model.safetensors"
    save_file({"w": torch.zeros(8)}, good)
    assert diagnose.file_damage(good) is None
    size = good.stat().st_size
    truncate(good, size - 4)
    (length,) = struct.unpack("<Q", good.read_bytes()[:8])
    assert diagnose.file_damage(good) == f"{size - 4} bytes, its header says {size}"
    truncate(good, 6)
    assert diagnose.file_damage(good) == "6 bytes, shorter than a safetensors header"
    bad = tmp_path / "config.json"
    bad.write_text('{"a": ')
    assert diagnose.file_damage(bad).startswith("not valid JSON: Expecting value")


def test_checkpoint_check_is_cheap(tmp_path):
    step = save_step(tmp_path, 1, world=8)
    big = step / "actor/model_world_size_8_rank_0.pt"
    torch.save({"w": torch.zeros(16 * 2**20 // 4)}, big)  # 16 MiB that must not be read
    start = time.perf_counter()
    assert checkpoint_problem(tmp_path) is None
    assert time.perf_counter() - start < 0.5


# ---- model_problem ----
def fake_cache(root: Path, repo: str) -> None:
    """The Hugging Face cache layout of one model at revision main: refs/main -> snapshots/<hash>/config.json."""
    folder = root / f"models--{repo.replace('/', '--')}"
    snapshot = folder / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text("{}")
    (folder / "refs").mkdir()
    (folder / "refs" / "main").write_text("0" * 40)


def test_local_paths_are_the_launchers_to_check():
    assert model_problem("/models/qwen", env={}) is None
    assert model_problem("./qwen", env={}) is None
    assert model_problem("hdfs://nn/models/qwen", env={}) is None


def test_cached_model_is_no_problem(tmp_path):
    fake_cache(tmp_path / "hub", "Qwen/Qwen2.5-0.5B-Instruct")
    offline = {"HF_HUB_OFFLINE": "1", "HF_ENDPOINT": "http://127.0.0.1:9"}
    assert model_problem("Qwen/Qwen2.5-0.5B-Instruct", {**offline, "HF_HUB_CACHE": str(tmp_path / "hub")}) is None
    assert model_problem("Qwen/Qwen2.5-0.5B-Instruct", {**offline, "HF_HOME": str(tmp_path)}) is None


def test_offline_and_not_cached_is_a_problem(tmp_path):
    env = {"HF_HUB_CACHE": str(tmp_path), "HF_HUB_OFFLINE": "1"}
    assert model_problem("Qwen/Qwen2.5-0.5B-Instruct", env) == (
        f"MODEL=Qwen/Qwen2.5-0.5B-Instruct is not in the Hugging Face cache {tmp_path} and HF_HUB_OFFLINE=1: "
        f"download it first (`hf download Qwen/Qwen2.5-0.5B-Instruct`, which fills {tmp_path}) or point MODEL at a "
        "local folder")


def test_unreachable_hub_is_a_problem_within_seconds(tmp_path):
    env = {"HF_HUB_CACHE": str(tmp_path), "HF_ENDPOINT": "http://127.0.0.1:9"}  # nothing listens on port 9
    start = time.perf_counter()
    problem = model_problem("Qwen/Qwen2.5-0.5B-Instruct", env)
    assert time.perf_counter() - start < diagnose.HUB_TIMEOUT + 2
    assert problem.startswith(f"MODEL=Qwen/Qwen2.5-0.5B-Instruct is not in the Hugging Face cache {tmp_path} and "
                              "http://127.0.0.1:9 cannot be reached (ConnectError: ")
    assert problem.endswith("or point MODEL at a local folder")


def test_a_hub_that_hangs_is_given_up_on(tmp_path, monkeypatch):
    import huggingface_hub

    monkeypatch.setattr(diagnose, "HUB_TIMEOUT", 0.2)
    monkeypatch.setattr(huggingface_hub.HfApi, "model_info", lambda self, *a, **k: time.sleep(30))
    start = time.perf_counter()
    problem = model_problem("org/name", {"HF_HUB_CACHE": str(tmp_path), "HF_ENDPOINT": "http://hub.invalid"})
    assert time.perf_counter() - start < 2
    assert "http://hub.invalid did not answer within 1 s" in problem


def test_model_the_hub_has_is_no_problem(tmp_path, monkeypatch):
    import huggingface_hub

    asked = []
    monkeypatch.setattr(huggingface_hub.HfApi, "model_info", lambda self, repo_id, **k: asked.append(
        (self.endpoint, repo_id, k["timeout"])))
    assert model_problem("org/name", {"HF_HUB_CACHE": str(tmp_path), "HF_ENDPOINT": "http://mirror.test/"}) is None
    assert asked == [("http://mirror.test", "org/name", diagnose.HUB_TIMEOUT)]


def test_unknown_model_and_bad_id(tmp_path, monkeypatch):
    import httpx
    import huggingface_hub
    from huggingface_hub.errors import RepositoryNotFoundError

    def not_found(self, repo_id, **kwargs):
        response = httpx.Response(404, request=httpx.Request("GET", f"http://hub.test/api/models/{repo_id}"))
        raise RepositoryNotFoundError("404 Client Error: Repository Not Found", response=response)

    monkeypatch.setattr(huggingface_hub.HfApi, "model_info", not_found)
    env = {"HF_HUB_CACHE": str(tmp_path), "HF_ENDPOINT": "http://hub.test"}
    assert model_problem("org/nope", env) == (
        f"MODEL=org/nope is not in the Hugging Face cache {tmp_path} and http://hub.test has no such model (or it is "
        f"private: set HF_TOKEN): download it first (`hf download org/nope`, which fills {tmp_path}) or point MODEL "
        "at a local folder")
    assert model_problem("org/two/slashes", env).startswith(
        "MODEL=org/two/slashes is neither a local folder nor a Hugging Face model id (")
