"""The Python API: sessions and batches for scripts and notebooks."""
