"""Serving: many generation requests at once over one compiled model (issue 12).

:class:`Engine` batches requests continuously over the paged KV cache (engine.py, with
scheduler.py deciding each step and request.py the per-request state and handles); the
speculative proposers, the incremental detokenizer and the HTTP server live beside it.
"""

from transfuse.serving.engine import Engine
from transfuse.serving.request import Output, RequestHandle, Result

__all__ = ["Engine", "RequestHandle", "Output", "Result"]
