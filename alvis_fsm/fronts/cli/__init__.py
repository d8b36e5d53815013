"""The terminal front: ``main`` parses and dispatches, ``commands`` holds one module per command."""
