"""ml_collections config files; each `get_config()` returns a ConfigDict (importable for composition)."""
