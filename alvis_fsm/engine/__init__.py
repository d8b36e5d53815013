"""The engine: a session's life and a batch's, with no terminal in it.

- ``session/``: one SLURM job running vLLM: its machine, record, driver and tunnel.
- ``batch/``: the OpenAI Batch API run as resumable SLURM job arrays.
- ``settings/``: the TOML layers, their model, each key's one description.
- ``fit/``: what a model needs and where it fits: catalog, GPU sizing, load times.
- ``observer.py``: how the engine speaks (it never prints, prompts or traps a signal).

It uses the cluster side and is used by the fronts, never the other way
round (see tests/unit/test_layout.py)."""
