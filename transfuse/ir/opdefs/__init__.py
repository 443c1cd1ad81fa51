"""IR op definitions, grouped by kind. Importing the package registers them all."""

from transfuse.ir.opdefs import elementwise, linalg, misc, nn, reduce, shape  # noqa: F401
from transfuse.ir.opdefs import fused  # noqa: F401  (after nn: it reuses the norms)
