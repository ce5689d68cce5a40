"""pyproject.toml lists every package (the list is explicit because conf/ maps to fedsim.conf)."""

from __future__ import annotations

import tomllib

from setuptools import find_packages

from tests.conftest import ROOT


def test_every_package_is_listed():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    listed = set(project["tool"]["setuptools"]["packages"])
    found = {p for p in find_packages(str(ROOT), include=["fedsim*", "strategies*"])}
    assert found | {"fedsim.conf"} == listed


def test_console_script_and_flower_components():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert project["project"]["scripts"]["fedsim"] == "fedsim.cli:main"
    components = project["tool"]["flwr"]["app"]["components"]
    assert components == {
        "serverapp": "fedsim.apps.server:app",
        "clientapp": "fedsim.apps.client:app",
    }
