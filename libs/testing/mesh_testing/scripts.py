"""The repository's scripts (``infra/``, ``bench/``, ``tests/packaging/code_shape.py``), imported by
tests as modules: they are no package's, so they are loaded from their files."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType


def load_script(path: Path, name: str | None = None) -> ModuleType:
    """The script at ``path`` as module ``name`` (its file's stem by default), loaded once: a second
    test file that loads it gets the same module (one set of classes), and dataclasses and typing
    find it by name in ``sys.modules``."""
    name = name or path.stem
    loaded = sys.modules.get(name)
    if loaded is not None and Path(getattr(loaded, "__file__", "") or "") == path:
        return loaded
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None, path
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
    return module
