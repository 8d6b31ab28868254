"""`python -m isreshape_verl.lab ...` ≡ `isreshape-verl lab ...`."""

import sys

try:
    from isreshape_verl.lab.cli import main
except KeyboardInterrupt:  # Ctrl-C while importing torch and verl: one line, as during the run
    print("isreshape-verl lab: interrupted; nothing written", file=sys.stderr)
    sys.exit(130)

sys.exit(main())
