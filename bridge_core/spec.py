"""Adapter specs: an architecture described as data, loadable from TOML or JSON.

Version 2 of the language adds, without changing what a v1 spec means: size expressions
(`bridge_core.expr`), per-hook taps with declarative views (`TapSpec`, `ViewSpec`), removal of
hook points and aliases, hook points that fire several times per forward (`calls`,
`collect`), and what `verify` needs to know (`VerifySpec`).
"""

from __future__ import annotations

import json
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal, Self

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from bridge_core import expr
from bridge_core.config import TransformerBridgeConfig
from bridge_core.errors import SpecError

Size = int | str
"""A literal size or an expression over TransformerBridgeConfig fields (``"n_heads * d_head"``)."""

_VIEW_OPS = ("split", "reshape", "flatten", "select", "transpose", "tokens")

Task = Literal["causal-lm", "image-text-to-text", "seq2seq-lm", "masked-lm", "base"]
"""What a model does, which names the ``transformers`` Auto class that loads it (``boot``)."""


class ViewSpec(BaseModel):
    """One step of a view on a tapped tensor; exactly one operation per step.

    - ``split`` (sizes) and ``index``: that part of the last dimension split into `sizes`.
    - ``reshape`` (sizes): the last dimension as several (``["n_heads", "3 * d_head"]``).
    - ``flatten`` (n): the last `n` dimensions as one.
    - ``select`` (index) and ``dim``: that index of dimension `dim` (the dimension goes).
    - ``transpose`` ([d0, d1]): two dimensions swapped.
    - ``tokens`` (path): a flattened ``[batch * pos, ...]`` as ``[batch, pos, ...]``, taking
      batch and pos from the input ids (or embeddings) of the module at `path`, relative to
      the model like a top-level component's path (``""``: the model's own input).

    Every step is invertible, so an edit of the view is written back into the tensor.
    """

    model_config = ConfigDict(extra="forbid", defer_build=True)

    split: list[Size] | None = None
    index: int | None = None
    reshape: list[Size] | None = None
    flatten: int | None = Field(default=None, ge=2)
    select: int | None = None
    dim: int | None = None
    transpose: tuple[int, int] | None = None
    tokens: str | None = None

    @model_validator(mode="after")
    def _one_operation(self) -> Self:
        ops = [op for op in _VIEW_OPS if getattr(self, op) is not None]
        if len(ops) != 1:
            raise ValueError(
                f"a view step has exactly one of {list(_VIEW_OPS)} (got {ops or 'none'})"
            )
        if (self.index is not None) != (ops[0] == "split"):
            raise ValueError("`index` goes with `split` (which part to take), and only with it")
        if (self.dim is not None) != (ops[0] == "select"):
            raise ValueError(
                "`dim` goes with `select` (which dimension to index), and only with it"
            )
        for size in [*(self.split or []), *(self.reshape or [])]:
            if isinstance(size, str):
                _check_expression(size)
        return self

    @property
    def operation(self) -> str:
        """The name of this step's operation."""
        return next(op for op in _VIEW_OPS if getattr(self, op) is not None)


class TapSpec(BaseModel):
    """Where a hook point reads its tensor: a submodule's output or input, seen through a view.

    `module` is relative to the component's HF module (``""``: the module itself); `arg` is the
    keyword an input arrives under when it is not passed positionally.
    """

    model_config = ConfigDict(extra="forbid", defer_build=True)

    module: str = ""
    at: Literal["output", "input"] = "output"
    arg: str | None = None
    view: list[ViewSpec] = Field(default_factory=list)

    @model_validator(mode="after")
    def _arg_for_inputs(self) -> Self:
        if self.arg is not None and self.at != "input":
            raise ValueError("`arg` names an input keyword: it needs at = 'input'")
        return self


def _check_expression(text: str) -> None:
    try:
        expr.parse(text)
    except expr.ExpressionError as exc:
        raise ValueError(str(exc)) from None


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
    hooks: dict[str, TapSpec] = Field(default_factory=dict)
    remove_hooks: list[str] = Field(default_factory=list)
    calls: int | str = 1
    collect: Literal["list", "stack", "cat"] = "list"
    shapes: dict[str, list[Size]] = Field(default_factory=dict)

    @property
    def paths(self) -> list[str]:
        """The candidate paths, in the order they are tried (``"."``: the parent itself)."""
        return [self.path] if isinstance(self.path, str) else list(self.path)

    @field_validator("path")
    @classmethod
    def _non_empty(cls, value: str | list[str]) -> str | list[str]:
        if not value or (isinstance(value, list) and not all(value)):
            raise ValueError(
                "path must name at least one submodule path ('.' for the parent module itself)"
            )
        return value

    @field_validator("hooks", "shapes")
    @classmethod
    def _hook_names(cls, value: dict[str, Any]) -> dict[str, Any]:
        bad = [name for name in value if not name.startswith("hook_") or "." in name]
        if bad:
            raise ValueError(f"hook point names start with 'hook_' and have no dots (got {bad})")
        return value

    @field_validator("calls")
    @classmethod
    def _calls(cls, value: int | str) -> int | str:
        if isinstance(value, int) and value < 1:
            raise ValueError(
                f"calls is how often the hook points fire per forward, >= 1 (got {value})"
            )
        if isinstance(value, str) and value != "any":
            _check_expression(value)
        return value


class VerifySpec(BaseModel):
    """What `verify` needs to know that the model's structure does not say."""

    model_config = ConfigDict(extra="forbid", defer_build=True)

    unreachable: list[str] = Field(default_factory=list)
    """Hook names (fnmatch patterns) whose edits cannot reach the outputs by construction."""
    skip: dict[str, str] = Field(default_factory=dict)
    """Checks that do not apply to this architecture, with the reason (``heads``, ``pattern``,
    ``residual``): e.g. ``pattern = "T5 adds a learned position bias to the scores"``."""

    @field_validator("skip")
    @classmethod
    def _skippable(cls, value: dict[str, str]) -> dict[str, str]:
        unknown = sorted(set(value) - {"heads", "pattern", "residual"})
        if unknown:
            raise ValueError(
                f"only 'heads', 'pattern' and 'residual' can be skipped (got {unknown})"
            )
        if not all(reason.strip() for reason in value.values()):
            raise ValueError("a skipped check needs its reason")
        return value


class ConfigMapping(BaseModel):
    """How TransformerBridgeConfig fields come from the HF config."""

    model_config = ConfigDict(extra="forbid", defer_build=True)

    from_hf: dict[str, str | list[str]] = Field(default_factory=dict)
    fixed: dict[str, Any] = Field(default_factory=dict)

    @field_validator("from_hf")
    @classmethod
    def _expressions(cls, value: dict[str, str | list[str]]) -> dict[str, str | list[str]]:
        for key, candidates in value.items():
            for text in [candidates] if isinstance(candidates, str) else candidates:
                try:
                    _check_expression(text)
                except ValueError as exc:
                    raise ValueError(f"{key}: {exc}") from None
        return value

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
    task: Task | None = None
    """The Auto class `boot` loads a checkpoint through when its architecture is no
    ``transformers`` class (renamed, remote code); None: derived (`bridge_core.loading`)."""
    priority: int = 0
    description: str = ""
    examples: list[str] = Field(default_factory=list)
    """Hub ids of checkpoints this adapter loads, for people (the support matrix)."""
    config: ConfigMapping = Field(default_factory=ConfigMapping)
    components: dict[str, ComponentSpec]
    hook_aliases: dict[str, str] = Field(default_factory=dict)
    verify: VerifySpec = Field(default_factory=VerifySpec)

    @field_validator("hook_aliases")
    @classmethod
    def _templates(cls, value: dict[str, str]) -> dict[str, str]:
        for alias, target in value.items():
            if ("{i}" in alias) != ("{i}" in target):
                raise ValueError(
                    f"{alias!r} = {target!r}: a template has '{{i}}' in both the alias and the "
                    "target (each layer's alias points at that layer's hook), or in neither"
                )
        return value

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
        lookup = hf_lookup(hf_config)
        for field, candidates in self.config.from_hf.items():
            value = _first_value(lookup, candidates)
            if value is not expr.MISSING and value is not None:
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


def _first_value(lookup: expr.Lookup, candidates: str | list[str]) -> Any:
    for text in [candidates] if isinstance(candidates, str) else candidates:
        value = expr.evaluate(text, lookup)
        if value is not expr.MISSING and value is not None:
            return value
    return expr.MISSING


def hf_lookup(hf_config: Any) -> expr.Lookup:
    """Read dotted names from an HF config: its attributes, nested configs and dict entries.

    Only data is read: the walk enters HF configs and mappings, never other objects, and
    skips callables, so a spec cannot reach anything but configuration values.
    """
    from transformers import PretrainedConfig

    def lookup(dotted: str) -> Any:
        value: Any = hf_config
        for part in dotted.split("."):
            if isinstance(value, PretrainedConfig):
                value = getattr(value, part, expr.MISSING)
            elif isinstance(value, Mapping):
                value = value.get(part, expr.MISSING)
            else:
                return expr.MISSING
            if value is expr.MISSING or callable(value):
                return expr.MISSING
        return value

    return lookup


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
