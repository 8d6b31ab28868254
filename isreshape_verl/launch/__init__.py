"""The recipes' launcher: every knob, its checks, the Hydra overrides it becomes, and the run itself.

`recipes/<dataset>/<loss>.sh` and `compare.sh` are thin wrappers over `python -m isreshape_verl.launch`.
"""
