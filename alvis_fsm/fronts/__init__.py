"""The front ends: what a person or a program holds.

The command line (``cli``: parsing in ``cli.main``, one module per command
in ``cli.commands``), the Python API (``api``), and what they share for
people: terminal reporting (``ui``), JSON output (``output``), desktop
notifications (``notify``) and the settings reference (``confref``)."""
