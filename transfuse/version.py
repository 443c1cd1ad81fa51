"""The transfuse version, in a leaf module: what saved artifacts and exported models record.

Kept out of ``transfuse/__init__.py`` so that modules writing it (``runtime/artifact.py``,
``codegen/onnx/builder.py``) need not import the top-level package, whose lazy attributes
import them back.
"""

__version__ = "0.1.0"
