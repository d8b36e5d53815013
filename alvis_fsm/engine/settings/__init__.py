"""Settings: the TOML layers, their model, each key's documentation."""
