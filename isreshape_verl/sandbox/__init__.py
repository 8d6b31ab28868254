"""The CPU sandbox: `isreshape-verl compare` (see `isreshape_verl.sandbox.cli`)."""
