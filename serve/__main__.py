"""`python -m serve run serve/config.yaml`: serve the students, exiting with the error when one cannot be served
(serve/commands.py)."""

import sys

from serve.commands import main

sys.exit(main())
