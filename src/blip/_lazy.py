"""Package names imported from their modules on first use (PEP 562), so that importing a package (e.g. to
register its command) does not load what it exports."""
import importlib


def lazy_exports(package: str, exports: dict[str, str]):
    """A module `__getattr__` that imports `exports[name]` (a submodule of `package`) when `name` is first read."""
    def __getattr__(name):
        if name in exports:
            return getattr(importlib.import_module(f".{exports[name]}", package), name)
        raise AttributeError(f"module {package!r} has no attribute {name!r}")
    return __getattr__
