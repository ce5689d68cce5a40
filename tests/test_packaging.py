"""pyproject.toml lists every package (the list is explicit because conf/ maps to fedsim.conf)."""

from __future__ import annotations

import tomllib

from setuptools import find_packages

from tests.conftest import ROOT


def test_every_package_and_config_group_is_listed():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    listed = set(project["tool"]["setuptools"]["packages"])
    found = set(find_packages(str(ROOT), include=["fedsim*", "strategies*"]))
    groups = {
        f"fedsim.conf.{d.name}"
        for d in (ROOT / "conf").iterdir()
        if d.is_dir() and not d.name.startswith("__")
    }
    assert found | {"fedsim.conf"} | groups == listed
    data = project["tool"]["setuptools"]["package-data"]
    assert all(data.get(g) == ["*.yaml"] for g in groups | {"fedsim.conf"})


def test_console_script_and_flower_components():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert project["project"]["scripts"]["fedsim"] == "fedsim.cli:main"
    components = project["tool"]["flwr"]["app"]["components"]
    assert components == {
        "serverapp": "fedsim.apps.server:app",
        "clientapp": "fedsim.apps.client:app",
    }
