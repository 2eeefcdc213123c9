"""Built-in adapters for text architectures, shipped as TOML specs."""
