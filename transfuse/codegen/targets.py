"""The targets a user can compile for, by name: the one table of backends.

``optimize(target=...)``, ``load()``, the benchmarks and the CLI all find a backend
here. Each entry names the module that defines the backend's :class:`Target` class;
the module is imported on first use, so ``import transfuse`` does not load torch
code generation or onnxruntime.

A new backend adds one line to :data:`TARGET_MODULES` and a ``target.py`` in its
package defining ``TARGET_CLASS``.
"""

from __future__ import annotations

import importlib

from transfuse.codegen.lowering import Target
from transfuse.errors import LoweringError

#: target name -> module whose ``TARGET_CLASS`` is the backend's :class:`Target`
TARGET_MODULES: dict[str, str] = {
    "python": "transfuse.codegen.python.target",
    "onnxruntime": "transfuse.codegen.onnx.target",
    "triton": "transfuse.codegen.triton.target",
    "tensorrt": "transfuse.codegen.tensorrt.target",
}

_INSTANCES: dict[str, Target] = {}


def target_names() -> tuple[str, ...]:
    """Every target name, in the table's order (``python`` first: the default)."""
    return tuple(TARGET_MODULES)


def get_target(name: str) -> Target:
    """The target called ``name`` (one instance per process); LoweringError if unknown."""
    target = _INSTANCES.get(name)
    if target is not None:
        return target
    try:
        module = TARGET_MODULES[name]
    except (KeyError, TypeError):
        raise LoweringError(f"unknown target {name!r}; available targets: "
                            f"{', '.join(TARGET_MODULES)}") from None
    try:
        cls = importlib.import_module(module).TARGET_CLASS
    except ModuleNotFoundError as e:  # a backend's own dependency (triton, onnxruntime)
        if e.name is None or e.name.split(".")[0] == __name__.split(".")[0]:  # our own: a bug
            raise
        package = e.name.split(".")[0]
        raise LoweringError(f"target {name!r} needs the package {package!r}, which is not "
                            f"installed (pip install {package})") from e
    if not (isinstance(cls, type) and issubclass(cls, Target)) or cls.name != name:
        raise LoweringError(f"{module}.TARGET_CLASS is not the Target named {name!r}")
    target = _INSTANCES[name] = cls()
    return target


__all__ = ["TARGET_MODULES", "target_names", "get_target"]
