"""Lazy re-exports for the command modules whose library moved into modules of their own.

`mlx_dgemma.generate`, `mlx_dgemma.convert` and `mlx_dgemma.train` are what `python -m` runs, and were once the
library too: `from mlx_dgemma.generate import generate_tokens` must keep working, but `--help` must not import MLX.
So each such module lists the names it re-exports and where they live, and they are imported on first use.
"""

from __future__ import annotations

import importlib
import sys
import types


def lazy_reexports(module_name: str, library: dict[str, tuple[str, ...]], call: str | None = None) -> None:
    """Give the module `module_name` the names of `library` ({sibling module: names}), each imported when first
    read; with `call`, the module can also be called as that function (`mlx_dgemma.convert(...)`)."""
    home = {name: module for module, names in library.items() for name in names}
    package = module_name.rpartition(".")[0]

    class LazyModule(types.ModuleType):
        def __getattr__(self, name):
            if name in home:
                return getattr(importlib.import_module(f".{home[name]}", package), name)
            raise AttributeError(f"module {module_name!r} has no attribute {name!r}")

        if call is not None:
            def __call__(self, *args, **kwargs):
                return getattr(self, call)(*args, **kwargs)

    sys.modules[module_name].__class__ = LazyModule
