"""Layout contracts: platform/ is a src folder, never a package."""

from __future__ import annotations

import os
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_platform_has_no_init():
    assert not (ROOT / "platform" / "__init__.py").exists()


def test_stdlib_platform_still_works_with_keel_installed():
    code = "import keel, platform; print(platform.python_version())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd="/")
    assert out.stdout.strip() == ".".join(map(str, sys.version_info[:3]))


def test_every_subpackage_is_listed_in_pyproject():
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    pkg = ROOT / "platform" / "keel"
    found = {".".join(("keel", *p.parent.relative_to(pkg).parts)) for p in pkg.rglob("__init__.py")}
    assert found | {"keel.conf"} <= listed


def test_configs_ship_with_the_package():
    import keel.conf

    conf = Path(keel.conf.__file__).parent
    assert (conf / "config.yaml").is_file()
    assert (conf / "model" / "tiny.yaml").is_file()


def test_wheel_ships_the_configs(tmp_path):
    import zipfile

    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp_path), str(ROOT)],
                   check=True, capture_output=True, timeout=300)
    (wheel,) = tmp_path.glob("keel_sft-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    assert "keel/conf/config.yaml" in names and "keel/conf/model/tiny.yaml" in names
    assert "keel/cli/main.py" in names
    assert not any(n.startswith("platform/") for n in names)
    # A non-editable install of that wheel composes the config from any directory.
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target), str(wheel)],
                   check=True, capture_output=True, timeout=300)
    code = ("import sys, keel; assert keel.__file__.startswith(sys.argv[1]), keel.__file__; "
            "from keel.cli.main import main; main(['train', '--cfg', 'job', 'mix.T=3'])")
    out = subprocess.run([sys.executable, "-c", code, str(target)], cwd=tmp_path, capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": str(target)}, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "T: 3.0" in out.stdout
