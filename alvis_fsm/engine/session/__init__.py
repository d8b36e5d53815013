"""The interactive session: one SLURM job running vLLM, its machine, its record, its driver, its tunnel."""
