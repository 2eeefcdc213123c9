"""Built-in adapters for text architectures, shipped as TOML specs."""

from importlib.resources import files
from pathlib import Path


def spec_paths() -> list[Path]:
    """The TOML spec files shipped with this package."""
    return sorted(
        Path(str(p))
        for p in files(__package__).joinpath("specs").iterdir()
        if str(p).endswith(".toml")
    )
