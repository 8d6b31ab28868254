"""Record (or compare) the `DRY_RUN=1` output of every recipe entry point: the golden commands.

    python tests/golden/record_dry_runs.py            # write tests/golden/dry_runs.json
    python tests/golden/record_dry_runs.py --check    # compare today's output with the file

Each case is a script, its knobs and its trailing arguments. What is stored is what a user sees: exit status,
stdout and stderr, with the machine-specific parts replaced by placeholders (the repository's path, the pid in
the private Ray folder). `tests/test_golden_commands.py` replays every case and compares the commands as argv
lists (the quoting style of the printed command may differ; the arguments may not).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
GOLDEN = Path(__file__).with_name("dry_runs.json")
HOME = "/home/user"

IS_KNOBS = {"IS_WIDTH": "0.5", "IS_KERNEL": "cauchy", "IS_GAMMA_MODE": "fixed", "IS_GAMMA": "0.3"}


def cases() -> list[dict]:
    """Every recipe x ASYNC x DEVICE, then knob combinations, compare and the cluster launchers."""
    out = []

    def add(script, env=None, args=()):
        out.append({"script": script, "env": dict(env or {}), "args": list(args)})

    for dataset in ("gsm8k", "math", "tiny"):
        for loss in ("grpo", "sapo", "isreshape"):
            for mode in ("sync", "colocate", "separate"):
                for device in ("gpu", "cpu"):
                    add(f"recipes/{dataset}/{loss}.sh", {"ASYNC": mode, "DEVICE": device})
        add(f"recipes/{dataset}/isreshape.sh")  # the script's own defaults
    for loss in ("grpo", "sapo", "isreshape"):
        add(f"recipes/gsm8k/{loss}.sh", {"ASYNC": "separate", "NNODES": "2"})
        add(f"recipes/math/{loss}.sh", {"ASYNC": "separate", "NNODES": "3", "ROLLOUT_NODES": "1"})
    add("recipes/gsm8k/isreshape.sh", {"ASYNC": "separate", "GPUS_PER_NODE": "4", "ROLLOUT_GPUS": "1",
                                        "TRAIN_BATCH": "128", "MINI_BATCH": "32", "CKPT_BACKEND": "nixl"})
    add("recipes/gsm8k/grpo.sh", {"ASYNC": "colocate", "STALENESS": "4", "NNODES": "2", "GPUS_PER_NODE": "4"})
    add("recipes/tiny/isreshape.sh", {"ROLLOUT": "vllm"})
    add("recipes/tiny/isreshape.sh", {"ROLLOUT": "vllm", "ASYNC": "separate"})
    add("recipes/tiny/grpo.sh", {"ROLLOUT": "vllm", "ASYNC": "colocate"})
    add("recipes/gsm8k/isreshape.sh", {"DEVICE": "cpu", "ROLLOUT": "vllm"})
    add("recipes/gsm8k/isreshape.sh", IS_KNOBS)
    add("recipes/tiny/isreshape.sh", {**IS_KNOBS, "IS_WIDTH_MODE": "adaptive", "IS_ONE_SIDED": "false",
                                       "ASYNC": "separate"})
    add("recipes/tiny/grpo.sh", {"STEPS": "5", "CLIP_RATIO": "0.28", "SEED": "7", "LR": "3e-4"})
    add("recipes/gsm8k/sapo.sh", {"SAPO_TAU_POS": "1.2", "SAPO_TAU_NEG": "0.9", "TEMPERATURE": "0.7", "WANDB": "1"})
    add("recipes/math/grpo.sh", {"STEPS": "100", "EPOCHS": "2", "TEST_FREQ": "5", "SAVE_FREQ": "20",
                                  "RUN_ROOT": "/shared/runs", "EXP_NAME": "mine", "PROJECT": "p",
                                  "MODEL": "/models/qwen", "DATA_DIR": "/shared/data/math"})
    add("recipes/gsm8k/grpo.sh", {"TRAIN_BATCH": "64", "MINI_BATCH": "16", "MICRO_BATCH": "4", "ROLLOUT_N": "4",
                                   "MAX_PROMPT_LEN": "256", "MAX_RESPONSE_LEN": "512", "LOSS_AGG_MODE": "token-mean",
                                   "ROLLOUT_TP": "2", "GPU_MEM_UTIL": "0.8"})
    add("recipes/tiny/isreshape.sh", {"ASYNC": "separate", "PARAM_SYNC_STEP": "4", "MINI_BATCH": "8"},
        ["trainer.total_epochs=3", "++actor_rollout_ref.actor.policy_loss.kernel=cauchy"])
    add("recipes/gsm8k/isreshape.sh", {}, ["data.train_batch_size=512", "+trainer.extra=1"])
    add("recipes/tiny/sapo.sh", {"DEVICE": "cpu", "GPUS_PER_NODE": "2", "TRAIN_BATCH": "16"})
    for dataset in ("gsm8k", "math", "tiny"):
        add(f"recipes/{dataset}/compare.sh", {"COMPARE_DIR": "/exp/c"})
    add("recipes/gsm8k/compare.sh", {"COMPARE_DIR": "/exp/c", "LOSSES": "isreshape grpo", "CLIP_RATIO": "0.3",
                                      "IS_WIDTH": "0.5", "ASYNC": "separate", "NNODES": "2"},
        ["trainer.total_epochs=2"])
    add("recipes/tiny/compare.sh", {"COMPARE_DIR": "/exp/t", "SAPO_TAU_POS": "1.1", "ASYNC": "colocate", "STEPS": "4"})
    add("recipes/tiny/compare.sh", {"COMPARE_DIR": "/exp/s", "SEEDS": "0 1", "LOSSES": "grpo isreshape:decoupled_token_is",
                                     "ASYNC": "separate", "STALENESS": "3"})
    add("recipes/cluster/ray_job.sh", {"NNODES": "2", "COMPARE_DIR": "/shared/exp", "ASYNC": "colocate"},
        ["recipes/gsm8k/compare.sh"])
    add("recipes/cluster/ray_job.sh", {"NNODES": "2", "RUN_ROOT": "/shared/runs", "IS_WIDTH": "0.5", "LR": "2e-6"},
        ["recipes/gsm8k/isreshape.sh", "trainer.total_epochs=1"])
    add("recipes/cluster/slurm.sbatch", {"NNODES": "3", "ASYNC": "separate"}, ["recipes/math/isreshape.sh"])
    add("recipes/cluster/slurm.sbatch", {"NNODES": "2", "COMPARE_DIR": "/shared/exp"}, ["recipes/gsm8k/compare.sh"])
    return out


def case_id(case: dict) -> str:
    knobs = " ".join(f"{k}={v}" for k, v in case["env"].items())
    return " ".join(filter(None, [knobs, case["script"], *case["args"]]))


def fake_vllm() -> str:
    """A folder with an empty `vllm` package: ROLLOUT=vllm's dry run only checks that it imports."""
    folder = tempfile.mkdtemp(prefix="golden-vllm-")
    (Path(folder) / "vllm").mkdir()
    (Path(folder) / "vllm" / "__init__.py").write_text("")
    return folder


def normalise(text: str) -> str:
    text = text.replace(str(REPO), "{REPO}")
    return re.sub(r"/isrv-\d+", "/isrv-{PID}", text)


def run_case(case: dict, vllm_dir: str) -> dict:
    env = {"PATH": os.environ["PATH"], "HOME": HOME, "DRY_RUN": "1", "RECIPE_CHECK": "0",
           "PYTHONPATH": vllm_dir, "TMPDIR": "/tmp", **case["env"]}
    proc = subprocess.run(["bash", case["script"], *case["args"]], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=120)
    return {"returncode": proc.returncode, "stdout": normalise(proc.stdout), "stderr": normalise(proc.stderr)}


def main() -> int:
    vllm_dir = fake_vllm()
    results = {case_id(c): {**c, **run_case(c, vllm_dir)} for c in cases()}
    if "--check" in sys.argv:
        golden = json.loads(GOLDEN.read_text())
        differ = [k for k in golden if golden[k] != results.get(k)]
        print(f"{len(golden) - len(differ)} of {len(golden)} equal")
        for k in differ:
            print("differs:", k)
        return 1 if differ else 0
    GOLDEN.write_text(json.dumps(results, indent=1) + "\n")
    failed = [k for k, r in results.items() if r["returncode"] != 0]
    print(f"{len(results)} cases -> {GOLDEN}; non-zero exit: {failed}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
