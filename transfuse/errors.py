"""Typed errors raised by transfuse.

Every error a user can see derives from :class:`TransfuseError`. A message says
what failed, where (input name, node, module path), and what to do next.
"""

from __future__ import annotations


class TransfuseError(Exception):
    """Base class of every error transfuse raises on purpose."""


class CaptureError(TransfuseError):
    """The model could not be captured into the IR (export failed, bad dynamic spec)."""


class UnsupportedOpError(TransfuseError):
    """An operator has no IR meaning and cannot be kept as a fallback."""


class IRVerifyError(TransfuseError):
    """The graph breaks an IR invariant (SSA, order, types, an op's own rule)."""


class ParseError(IRVerifyError):
    """The text form of a graph could not be parsed."""


class PassError(TransfuseError):
    """A pass failed or was misconfigured."""


class LoweringError(TransfuseError):
    """A backend could not lower a graph or a node."""


class InputError(TransfuseError):
    """A compiled model was called with inputs that do not match its signature."""


class QueueFullError(InputError):
    """A serving engine cannot take the request now: its waiting queue is full (back-pressure;
    an HTTP server answers 429). Retry later."""


class EngineClosedError(QueueFullError):
    """The serving engine was shut down and takes no new requests (an HTTP server answers 503)."""


class ExecutionError(TransfuseError):
    """A compiled model's backend failed while running a call (e.g. an ONNX Runtime kernel
    rejected its inputs); the message names the backend, the graph and the failing node."""


class ArtifactError(TransfuseError):
    """A saved artifact is missing, incomplete, tampered with or of an unknown version."""


__all__ = [
    "TransfuseError",
    "CaptureError",
    "UnsupportedOpError",
    "IRVerifyError",
    "ParseError",
    "PassError",
    "LoweringError",
    "InputError",
    "QueueFullError",
    "EngineClosedError",
    "ExecutionError",
    "ArtifactError",
]
