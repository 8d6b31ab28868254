import sys

from isreshape_verl.launch.cli import main

sys.exit(main())
