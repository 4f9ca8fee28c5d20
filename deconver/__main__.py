"""`python -m deconver <step>`: the `deconver` command run by a given interpreter (the workflow's rules use it)."""
import sys

from deconver.cli import main

sys.exit(main())
