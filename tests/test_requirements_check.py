"""The session-start check of tests/conftest.py names a missing or out-of-range package of the test extra."""

import importlib.util
import pathlib
from importlib import metadata

import pytest


@pytest.fixture
def unmet_requirements():
    spec = importlib.util.spec_from_file_location("root_conftest", pathlib.Path(__file__).parent / "conftest.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module._unmet_requirements


def test_the_installed_environment_meets_the_test_extra(unmet_requirements):
    assert unmet_requirements() == []


def test_a_missing_package_is_named(unmet_requirements, monkeypatch):
    real = metadata.version

    def version(name):
        if name == "peft":
            raise metadata.PackageNotFoundError(name)
        return real(name)

    monkeypatch.setattr(metadata, "version", version)
    (unmet,) = unmet_requirements()
    assert unmet.startswith("peft (needs peft") and unmet.endswith("; not installed)")


def test_a_version_outside_the_stated_range_is_named(unmet_requirements, monkeypatch):
    real = metadata.version
    monkeypatch.setattr(metadata, "version", lambda name: "0.0.1" if name == "hypothesis" else real(name))
    (unmet,) = unmet_requirements()
    assert unmet.startswith("hypothesis (needs hypothesis") and unmet.endswith("; 0.0.1 is installed)")
