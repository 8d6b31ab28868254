"""IS Reshape policy losses for LLM RL, as a verl plugin.

`isreshape_verl.reshape` and `isreshape_verl.kernels` are plain torch (usable from any trainer);
`isreshape_verl.verl_loss` registers the `is_reshape` loss in verl's policy-loss registry.
"""

import sys
from importlib.metadata import PackageNotFoundError, version

from isreshape_verl.reshape import ISReshapeParams, is_reshape_token_loss, reshape_terms

try:
    __version__ = version("isreshape-verl")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0+unknown"

if "verl" in sys.modules:
    # Imported by verl itself (actor_rollout_ref.model.external_lib=isreshape_verl) or after it:
    # register `is_reshape`. Without verl, importing this package never pulls verl in.
    from isreshape_verl import verl_loss  # noqa: F401

__all__ = ["ISReshapeParams", "is_reshape_token_loss", "reshape_terms", "__version__"]
