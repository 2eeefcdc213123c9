"""Adapter specs: an architecture described as data, loadable from TOML or JSON."""

from __future__ import annotations

import json
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Self

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from bridge_core.config import TransformerBridgeConfig
from bridge_core.errors import SpecError

_MISSING = object()


class ComponentSpec(BaseModel):
    """Which HF submodule is which bridge component.

    `path` is relative to the parent component's module (the HF model for top-level
    components); a list gives candidates tried in order, for HF versions that differ.
    """

    model_config = ConfigDict(extra="forbid", defer_build=True)

    kind: str
    path: str | list[str]
    options: dict[str, Any] = Field(default_factory=dict)
    submodules: dict[str, ComponentSpec] = Field(default_factory=dict)
    optional: bool = False

    @property
    def paths(self) -> list[str]:
        """The candidate paths, in the order they are tried."""
        return [self.path] if isinstance(self.path, str) else list(self.path)

    @field_validator("path")
    @classmethod
    def _non_empty(cls, value: str | list[str]) -> str | list[str]:
        if not value:
            raise ValueError("path must name at least one submodule path")
        return value


class ConfigMapping(BaseModel):
    """How TransformerBridgeConfig fields come from the HF config."""

    model_config = ConfigDict(extra="forbid", defer_build=True)

    from_hf: dict[str, str | list[str]] = Field(default_factory=dict)
    fixed: dict[str, Any] = Field(default_factory=dict)

    @field_validator("from_hf", "fixed")
    @classmethod
    def _known_fields(cls, value: dict[str, Any]) -> dict[str, Any]:
        known = TransformerBridgeConfig.model_fields
        unknown = sorted(set(value) - set(known))
        if unknown:
            raise ValueError(
                f"unknown TransformerBridgeConfig field(s) {unknown}; known: {sorted(known)}"
            )
        return value


class AdapterSpec(BaseModel):
    """An architecture as data: components, config mapping and hook aliases."""

    model_config = ConfigDict(extra="forbid", defer_build=True)

    name: str
    architectures: list[str]
    model_types: list[str] = Field(default_factory=list)
    model_class: str | None = None
    priority: int = 0
    description: str = ""
    config: ConfigMapping = Field(default_factory=ConfigMapping)
    components: dict[str, ComponentSpec]
    hook_aliases: dict[str, str] = Field(default_factory=dict)

    @classmethod
    def from_file(cls, path: str | Path) -> Self:
        """Load a spec from a ``.toml`` or ``.json`` file.

        Raises:
            SpecError: the file is missing, is not valid TOML/JSON (with the line), or
                does not validate (with the key).
        """
        path = Path(path)
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as exc:
            raise SpecError(f"cannot read adapter spec {path}: {exc.strerror or exc}") from exc
        data = _parse(path, text)
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            raise SpecError(f"invalid adapter spec {path}:\n{describe(exc)}") from exc

    def to_toml(self) -> str:
        """Serialize to TOML (round-trips through `from_file`)."""
        import tomli_w

        return tomli_w.dumps(self.model_dump(exclude_defaults=True, mode="json"))

    def to_json(self) -> str:
        """Serialize to JSON (round-trips through `from_file`)."""
        return json.dumps(self.model_dump(exclude_defaults=True, mode="json"), indent=2)

    def bridge_config(self, hf_config: Any, **extra: Any) -> TransformerBridgeConfig:
        """Derive the TransformerBridgeConfig of a model from its HF config.

        Raises:
            SpecError: a mapped attribute is missing, or the values do not validate.
        """
        values: dict[str, Any] = {}
        for field, candidates in self.config.from_hf.items():
            value = _first_attribute(hf_config, candidates)
            if value is not _MISSING and value is not None:
                values[field] = value
        values.update(self.config.fixed)
        values.update(extra)
        try:
            return TransformerBridgeConfig.model_validate(values)
        except ValidationError as exc:
            model = type(hf_config).__name__
            raise SpecError(
                f"adapter spec {self.name!r} derives a config that does not validate for "
                f"{model}:\n{describe(exc)}"
            ) from exc


def _parse(path: Path, text: str) -> Any:
    if path.suffix == ".json":
        try:
            return json.loads(text)
        except json.JSONDecodeError as exc:
            raise SpecError(
                f"{path} is not valid JSON: {exc.msg} (line {exc.lineno}, column {exc.colno})"
            ) from exc
    if path.suffix == ".toml":
        try:
            return tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise SpecError(f"{path} is not valid TOML: {exc}") from exc
    raise SpecError(f"adapter spec {path} must be a .toml or .json file (got {path.suffix!r})")


def _first_attribute(obj: Any, candidates: str | list[str]) -> Any:
    for dotted in [candidates] if isinstance(candidates, str) else candidates:
        value: Any = obj
        for part in dotted.split("."):
            if isinstance(value, Mapping):
                value = value.get(part, _MISSING)
            else:
                value = getattr(value, part, _MISSING)
            if value is _MISSING:
                break
        if value is not _MISSING:
            return value
    return _MISSING


def describe(exc: ValidationError) -> str:
    """One line per pydantic error: the dotted key, what was wrong, and the value given."""
    lines = []
    for error in exc.errors():
        key = ".".join(str(part) for part in error["loc"]) or "(top level)"
        value = error["input"]
        shown = error["type"] != "missing" and not isinstance(value, dict | list)
        given = f" (got {value!r:.60})" if shown else ""
        lines.append(f"  {key}: {error['msg']}{given}")
    return "\n".join(lines)
