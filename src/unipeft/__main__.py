"""``python -m unipeft`` runs the command line (see unipeft.cli)."""
import sys

from .cli import main

sys.exit(main())
