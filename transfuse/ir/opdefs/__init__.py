"""IR op definitions, one module per op family.

This is the one list of families; :mod:`transfuse.ir.ops` imports it once, and
each family registers its ops into :mod:`transfuse.ir.opdef` on import. A
family that builds on another imports it by name (``fused`` imports ``nn``), so
the order below does not matter. A new family is added here.
"""

from transfuse.ir.opdefs import (  # noqa: F401
    elementwise,
    fused,
    generation,
    indexing,
    linalg,
    misc,
    nn,
    quant,
    reduce,
    shape,
)
