"""``python -m flatpeft``: the same as the ``flatpeft`` command (:func:`flatpeft.cli.main`)."""
import sys

from flatpeft.cli import main

sys.exit(main())
