"""benchmarks/gpu/stubs: on a torch-only GPU image, verl's heavy imports get inert stand-ins, and only those."""

import subprocess
import sys
from pathlib import Path

STUBS = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu" / "stubs" / "sitecustomize.py"

PROBE = r"""
import dataclasses, importlib.util, json, sys
spec = importlib.util.spec_from_file_location("gpu_stubs", sys.argv[1])
stubs = importlib.util.module_from_spec(spec)
spec.loader.exec_module(stubs)
stubs.STUBBED.update({"isreshape_absent_pkg", "colorsys"})

import colorsys                               # installed: imported as usual, even when listed
from isreshape_absent_pkg.sub.deeper import Base, remote, CONSTANT
import isreshape_absent_pkg as absent

@dataclasses.dataclass
class Child(Base):                            # subclassing, also as a dataclass
    x: int = 1

@remote                                       # a bare decorator hands the function back
def f():
    return 7

@absent.remote(num_gpus=1)                    # a decorator factory too
def g():
    return 8

print(json.dumps({
    "colorsys_is_real": colorsys.rgb_to_hsv(1.0, 0.0, 0.0) == (0.0, 1.0, 1.0),
    "child": Child().x, "f": f(), "g": g(), "version": absent.__version__,
    "chain": type(absent.util.ActorHandle.options(name="a")).__name__,
    "constant_is_class": isinstance(CONSTANT, type),
}))
"""


def test_stubs_stand_in_only_for_missing_packages():
    out = subprocess.run([sys.executable, "-c", PROBE, str(STUBS)], capture_output=True, text=True, check=True)
    result = __import__("json").loads(out.stdout.strip().splitlines()[-1])
    assert result == {"colorsys_is_real": True, "child": 1, "f": 7, "g": 8, "version": "0", "chain": "options",
                      "constant_is_class": True}
