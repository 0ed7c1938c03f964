"""The user's layout installs as one package: passes/ as fxq.passes and backends/ as fxq.backends."""

from __future__ import annotations

import subprocess
import sys
import tomllib

from conftest import ROOT


def test_every_package_folder_is_listed_in_pyproject():
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = set()
    for top, name in (("fxq", "fxq"), ("passes", "fxq.passes"), ("backends", "fxq.backends")):
        for init in (ROOT / top).rglob("__init__.py"):
            rel = init.parent.relative_to(ROOT / top).parts
            found.add(".".join((name, *rel)))
    assert found == listed


def test_regular_install_maps_passes_and_backends(tmp_path):
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
                    "--target", str(target), str(ROOT)], check=True, cwd=tmp_path)
    assert not (target / "passes").exists() and not (target / "backends").exists()
    code = "import fxq.passes, fxq.backends, fxq.cli; print(fxq.passes.__file__); print(fxq.backends.__file__)"
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True,
                         cwd=tmp_path, env={"PYTHONPATH": str(target)}).stdout.split()
    assert out[0].startswith(str(target / "fxq" / "passes")) and out[1].startswith(str(target / "fxq" / "backends"))
