"""alvis-fsm: a private vLLM server on the Chalmers Alvis cluster, one command away."""

__version__ = "0.1.0"
