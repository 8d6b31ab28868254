"""`python -m isreshape_verl.lab ...` ≡ `isreshape-verl lab ...`."""

import sys

from isreshape_verl.lab.cli import main

sys.exit(main())
