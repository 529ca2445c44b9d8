"""Whether memtrain's declared requirements (and one of its extras) are installed in their stated ranges.

Read from the installed package's metadata, so the answer follows pyproject.toml. The test suite refuses
to start without them (tests/conftest.py) and ``memtrain-bench gpu-check`` skips its pytest section with
the same list, rather than letting pytest fail on a missing package.
"""

from __future__ import annotations

from importlib import metadata

__all__ = ["unmet_requirements"]


def unmet_requirements(extra: str | None = None) -> list[str]:
    """memtrain's requirements (and those of ``extra``) that are missing or outside their stated range,
    each as ``"name (needs spec; what is installed)"``; empty when all are met."""
    from packaging.requirements import Requirement

    try:
        declared = metadata.requires("memtrain") or []
    except metadata.PackageNotFoundError:
        return ["memtrain itself (the package under test is not installed)"]
    unmet = []
    for text in declared:
        req = Requirement(text)
        if req.marker is not None and not req.marker.evaluate({"extra": extra or ""}):
            continue  # another extra, or not for this platform
        try:
            version = metadata.version(req.name)
        except metadata.PackageNotFoundError:
            unmet.append(f"{req.name} (needs {req.name}{req.specifier}; not installed)")
            continue
        if req.specifier and not req.specifier.contains(version, prereleases=True):
            unmet.append(f"{req.name} (needs {req.name}{req.specifier}; {version} is installed)")
    return unmet
