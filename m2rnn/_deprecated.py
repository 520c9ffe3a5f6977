"""Old import paths of the applications, kept working for a while: importing one warns once and hands back the module
at its new path (the same module object, so classes and functions stay identical)."""

from __future__ import annotations

import importlib
import pkgutil
import sys
import warnings
from types import ModuleType


def alias_module(old: str, new: str) -> ModuleType:
    """Make `old` (and, for a package, each `old.sub`) name the module `new` (`new.sub`), with one FutureWarning.

    Called from the old module's own body: the import system then returns `sys.modules[old]`, the new module.
    """
    warnings.warn(f"{old} has moved to {new}; import it from there ({old} will be removed in a later release)",
                  FutureWarning, stacklevel=3)
    module = importlib.import_module(new)
    sys.modules[old] = module
    for info in pkgutil.iter_modules(getattr(module, "__path__", [])):
        sys.modules[f"{old}.{info.name}"] = importlib.import_module(f"{new}.{info.name}")
    return module
