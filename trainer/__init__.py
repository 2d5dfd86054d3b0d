"""The GRPO trainer that runs on the worker: `python -m trainer --config CONFIG --run-dir DIR`."""
