"""transfuse: a graph-level compiler and optimizer for Transformer models.

    compiled = transfuse.optimize(model, example_inputs)
    compiled(*example_inputs)          # same answers, faster
    print(compiled.pass_log)           # what every pass did
    compiled.save("out/model"); transfuse.load("out/model")
    gen = transfuse.optimize(model, (ids,), generation=True); gen.generate(ids)
    engine = transfuse.Engine(gen); engine.submit(prompt_ids).result()   # many requests at once
"""

from transfuse.errors import (
    ArtifactError,
    CaptureError,
    EngineClosedError,
    ExecutionError,
    InputError,
    IRVerifyError,
    LoweringError,
    PassError,
    QueueFullError,
    TransfuseError,
    UnsupportedOpError,
)

__version__ = "0.1.0"


def _fix_triton_mode() -> None:
    """Triton fixes interpreter-or-GPU mode when first imported (and transformers' model
    modules import it): where triton is installed, decide the mode now (the interpreter when
    there is no CUDA device: :mod:`transfuse.codegen.triton.env`), before anything else can."""
    import importlib.util
    import os
    import sys

    if "TRITON_INTERPRET" in os.environ or "triton" in sys.modules:
        return
    if importlib.util.find_spec("triton") is not None:
        import transfuse.codegen.triton.env  # noqa: F401


_fix_triton_mode()


def __getattr__(name):  # lazy: importing transfuse stays cheap
    if name == "optimize":
        from transfuse.api import optimize

        return optimize
    if name == "load":  # any artifact: a GenerationModel for a generation one
        from transfuse.runtime.generation_model import load

        return load
    if name == "PassLog":
        from transfuse.passes.log import PassLog

        return PassLog
    if name == "CompiledModel":
        from transfuse.runtime.compiled import CompiledModel

        return CompiledModel
    if name == "GenerationModel":
        from transfuse.runtime.generation_model import GenerationModel

        return GenerationModel
    if name == "models":  # the built-in reference models (transfuse.models.llama("tiny"))
        import importlib

        return importlib.import_module("transfuse.models")
    if name == "Engine":  # serving: continuous batching over a GenerationModel
        from transfuse.serving.engine import Engine

        return Engine
    raise AttributeError(f"module 'transfuse' has no attribute {name!r}")


__all__ = [
    "optimize",
    "load",
    "PassLog",
    "CompiledModel",
    "GenerationModel",
    "Engine",
    "TransfuseError",
    "CaptureError",
    "UnsupportedOpError",
    "IRVerifyError",
    "PassError",
    "LoweringError",
    "InputError",
    "QueueFullError",
    "EngineClosedError",
    "ExecutionError",
    "ArtifactError",
    "__version__",
]
