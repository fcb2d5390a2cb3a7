"""The lowest versions pyproject.toml allows, each tested in a venv of its own (marker ``floor``, deselected by
default; it downloads packages).

* ``hf``: exactly the floors of the ``hf`` extra (transformers, peft, accelerate ``==`` their ``>=`` bound) run
  ``tests/test_host_optimizer.py`` (the mixin, its optimizer wrapping and ``total_steps`` on transformers 4.x);
* ``trl``: the ``trl`` floor (with what pip resolves beside it) runs ``tests/test_trl_integration.py``.

Each venv gets ``pip install '<this checkout>[extra]' <package>==<floor> ...``, so the floors must also resolve
with the extra's own requirements; the tests then import the checkout's ``src`` (PYTHONPATH).

torch is the version running this test (install torch first, as the README says, so pip never pulls another
build). The venvs live in ``$FLATPEFT_FLOOR_VENVS`` (default ``~/.cache/flatpeft/floor-venvs``) and are reused.
Run: ``pytest -m floor tests/test_deps_floor.py``.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
import venv
from pathlib import Path

import pytest

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    tomllib = pytest.importorskip("tomli")

import torch

pytestmark = pytest.mark.floor

ROOT = Path(__file__).resolve().parents[1]
#: extra -> (packages pinned to their floor, test file run in the venv)
CASES = {
    "hf": (("transformers", "peft", "accelerate"), "tests/test_host_optimizer.py"),
    "trl": (("trl",), "tests/test_trl_integration.py"),
}


def floors(extra: str) -> dict[str, str]:
    """``{package: lowest version}`` from the ``>=`` bounds of ``extra`` in pyproject.toml."""
    with (ROOT / "pyproject.toml").open("rb") as f:
        requirements = tomllib.load(f)["project"]["optional-dependencies"][extra]
    out = {}
    for req in requirements:
        match = re.fullmatch(r"([A-Za-z0-9_.-]+)\s*>=\s*([0-9][0-9A-Za-z.]*)(\s*,.*)?", req.strip())
        if match:
            out[match.group(1).lower()] = match.group(2)
    return out


def floor_venv(extra: str, pins: dict[str, str]) -> Path:
    """A venv holding ``pins`` exactly, this torch and pytest (built once; pins re-applied if they changed)."""
    base = Path(os.environ.get("FLATPEFT_FLOOR_VENVS", Path.home() / ".cache" / "flatpeft" / "floor-venvs"))
    path = base / extra
    python = path / "bin" / "python"
    if not python.exists():
        venv.EnvBuilder(with_pip=True).create(path)
    torch_version = torch.__version__.split("+")[0]
    # the extra itself beside the pins: what `pip install 'flatpeft[trl]' 'trl==0.24.0'` resolves
    wanted = [f"torch=={torch_version}", "pytest", f"{ROOT}[{extra}]", *(f"{name}=={version}" for name, version in pins.items())]
    subprocess.run([str(python), "-m", "pip", "install", "-q", *wanted], check=True, timeout=1800)
    return python


def installed(python: Path, names: tuple[str, ...]) -> dict[str, str]:
    code = "import importlib.metadata as m, sys; print(' '.join(m.version(n) for n in sys.argv[1:]))"
    out = subprocess.run([str(python), "-c", code, *names], capture_output=True, text=True, check=True).stdout.split()
    return dict(zip(names, out))


@pytest.mark.parametrize("extra", list(CASES))
def test_lowest_allowed_versions(extra):
    """The extra's floors install together and the test file of its integration passes on them."""
    names, test_file = CASES[extra]
    pins = {name: version for name, version in floors(extra).items() if name in names}
    assert set(pins) == set(names), f"pyproject.toml: the {extra} extra lost a >= bound of {set(names) - set(pins)}"
    python = floor_venv(extra, pins)
    assert installed(python, names) == pins
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    run = subprocess.run([str(python), "-m", "pytest", test_file, "-p", "no:cacheprovider", "-o", "addopts=", "-q"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
    assert re.search(r"\d+ passed", run.stdout) and " failed" not in run.stdout
    print(f"{extra} floor {pins} (python {sys.version.split()[0]}): {run.stdout.strip().splitlines()[-1]}")
