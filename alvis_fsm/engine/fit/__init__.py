"""What a model needs and where it fits: the catalog, GPU sizing, ``--gpus auto``, load times."""
