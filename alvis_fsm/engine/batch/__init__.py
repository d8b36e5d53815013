"""Batches: the OpenAI Batch API run as resumable SLURM job arrays."""
