"""What runs on the cluster, not the laptop: the login node's agent (shell) and the compute node's job parts (the guard, the batch runner)."""
