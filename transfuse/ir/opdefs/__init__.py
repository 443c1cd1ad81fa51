"""IR op definitions, grouped by kind. Importing the package registers them all."""

from transfuse.ir.opdefs import (  # noqa: F401
    elementwise,
    fused,  # noqa: F401  (after nn: it reuses the norms)
    linalg,
    misc,
    nn,
    reduce,
    shape,
)
