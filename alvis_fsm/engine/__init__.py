"""The session engine: a session's life, with no terminal in it.

The state machine as data (``machine``), its driver (``runner``), the
persisted record (``store``), the layered settings (``settings``), the model
catalog (``catalog``) and the GPU fit (``fit``, ``autofit``, ``loadtimes``).
It uses the cluster side and is used by the fronts, never the other way
round (see tests/unit/test_layout.py)."""
