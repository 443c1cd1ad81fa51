"""``python -m transfuse ...`` runs the ``transfuse`` command (:func:`transfuse.cli.main`)."""

import sys

from transfuse.cli import main

if __name__ == "__main__":
    sys.exit(main())
