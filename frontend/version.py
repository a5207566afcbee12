"""The installed package's version, from its metadata (pyproject.toml is the one source)."""

import importlib.metadata


def octavo_version() -> str:
    # Run from a source tree on PYTHONPATH (the GPU machine, a container without an install)
    # there is no metadata: the server must still start.
    try:
        return importlib.metadata.version("octavo")
    except importlib.metadata.PackageNotFoundError:
        return "unknown (not installed)"
