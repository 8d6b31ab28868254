import sys

from isreshape_verl.sandbox.cli import main

sys.exit(main())
