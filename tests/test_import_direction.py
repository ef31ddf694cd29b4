"""lit_kd and lit_kt never import each other: every module of one loads in a fresh interpreter without the other."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

IMPORT_ALL = """
import importlib, json, pkgutil, sys
import {package}
names = [info.name for info in pkgutil.walk_packages({package}.__path__, "{package}.")]
for name in names:
    importlib.import_module(name)
other = sorted(m for m in sys.modules if m == "{other}" or m.startswith("{other}."))
print(json.dumps({{"imported": names, "other": other}}))
"""


@pytest.mark.parametrize(("package", "other"), [("lit_kd", "lit_kt"), ("lit_kt", "lit_kd")])
def test_no_module_of_one_package_loads_the_other(package, other):
    code = IMPORT_ALL.format(package=package, other=other)
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert f"{package}.cli" in report["imported"]  # the walk reached the modules, not only the package
    assert report["other"] == [], f"importing every module of {package} loaded {report['other']}"
