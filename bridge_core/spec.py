"""Adapter specs: an architecture described as data, loadable from TOML or JSON.

Version 2 of the language adds, without changing what a v1 spec means: size expressions
(`bridge_core.expr`), per-hook taps with declarative views (`TapSpec`, `ViewSpec`), removal of
hook points and aliases, hook points that fire several times per forward (`calls`,
`collect`), and what `verify` needs to know (`VerifySpec`).
"""

from __future__ import annotations

import json
import re
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

    @field_validator("submodules")
    @classmethod
    def _submodule_names(cls, value: dict[str, ComponentSpec]) -> dict[str, ComponentSpec]:
        return check_component_names(value)

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

    @model_validator(mode="before")
    @classmethod
    def _not_too_deep(cls, data: Any) -> Any:
        check_depth(data)
        return data

    @field_validator("components")
    @classmethod
    def _component_names(cls, value: dict[str, ComponentSpec]) -> dict[str, ComponentSpec]:
        return check_component_names(value)

    @field_validator("hook_aliases")
    @classmethod
    def _templates(cls, value: dict[str, str]) -> dict[str, str]:
        for alias, target in value.items():
            other = sorted({p for p in _PLACEHOLDER.findall(alias + target) if p != "{i}"})
            if other:
                raise ValueError(
                    f"{alias!r} = {target!r}: {', '.join(other)} is no placeholder; a template "
                    "has '{i}' (the layer index) in the alias and the target"
                )
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
            raw = path.read_bytes()
        except OSError as exc:
            raise SpecError(f"cannot read adapter spec {path}: {exc.strerror or exc}") from exc
        data = _parse(path, _decode(path, raw))
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


def spec_files(package: str, folder: str = "specs") -> list[Path]:
    """The spec files (``*.toml``) that `package` ships in its `folder`, in name order: what a
    plugin's ``register_adapters`` reads with `AdapterSpec.from_file`."""
    from importlib.resources import files

    found = files(package).joinpath(folder).iterdir()
    return sorted(Path(str(p)) for p in found if str(p).endswith(".toml"))


def _parse(path: Path, text: str) -> Any:
    if path.suffix not in (".json", ".toml"):
        raise SpecError(f"adapter spec {path} must be a .toml or .json file (got {path.suffix!r})")
    _check_nesting(path, text)
    try:
        if path.suffix == ".json":
            return json.loads(text, object_pairs_hook=_unique_keys)
        return tomllib.loads(text)
    except json.JSONDecodeError as exc:
        raise SpecError(
            f"{path} is not valid JSON: {exc.msg} (line {exc.lineno}, column {exc.colno})"
        ) from exc
    except tomllib.TOMLDecodeError as exc:
        raise SpecError(f"{path} is not valid TOML: {exc}") from exc
    except _DuplicateKey as exc:
        key, keys = exc.args
        raise SpecError(
            f"{path}, key {key!r}: given twice in one JSON object (the one with keys "
            f"{', '.join(map(repr, keys))}); a JSON parser would silently keep the last. "
            "Accepted: each key once per object"
        ) from None
    except RecursionError:  # _check_nesting lets no such file through; a last resort
        raise SpecError(
            f"{path}: nested too deeply to parse. Accepted: at most {MAX_DEPTH} levels"
        ) from None


MAX_DEPTH = 64
"""How deeply a spec may nest tables and lists (real specs use about 10)."""

_PLACEHOLDER = re.compile(r"\{[^{}]*\}")


class _DuplicateKey(Exception):
    """A JSON object with a key given twice: (key, the object's keys)."""


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise _DuplicateKey(key, [k for k, _ in pairs])
        result[key] = value
    return result


def _decode(path: Path, raw: bytes) -> str:
    """The file's text; a file that is not UTF-8 is an error naming the place."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        text = raw[: exc.start].decode("utf-8", errors="replace")
        raise SpecError(
            f"{path}{_place(path, text, len(text))}: byte 0x{raw[exc.start]:02x} is not UTF-8. "
            "Accepted: a UTF-8 text file (save it as UTF-8; TOML and JSON specs are UTF-8)"
        ) from None


def _check_nesting(path: Path, text: str) -> None:
    """Refuse tables and lists nested deeper than `MAX_DEPTH`, before a parser recurses."""
    toml, depth, i = path.suffix == ".toml", 0, 0
    while i < len(text):
        char = text[i]
        if char == '"' or (toml and char == "'"):
            quote = char * 3 if toml and text.startswith(char * 3, i) else char
            i += len(quote)
            while i < len(text) and not text.startswith(quote, i):
                i += 2 if char == '"' and text[i] == "\\" else 1
            i += len(quote)
            continue
        if toml and char == "#":
            end = text.find("\n", i)
            i = len(text) if end < 0 else end
            continue
        depth += char in "[{"
        depth -= char in "]}"
        if depth > MAX_DEPTH:
            raise SpecError(
                f"{path}{_place(path, text, i)}: nested deeper than {MAX_DEPTH} levels. "
                f"Accepted: at most {MAX_DEPTH} levels of tables and lists"
            )
        i += 1


def _place(path: Path, text: str, index: int) -> str:
    """``, key 'components.embed' (line 3, column 7)`` for a position in a spec's text."""
    line = text.count("\n", 0, index) + 1
    column = index - text.rfind("\n", 0, index)
    key = _key_before(text[:index], path.suffix == ".toml")
    return (f", key {key!r}" if key else "") + f" (line {line}, column {column})"


def _key_before(text: str, toml: bool) -> str | None:
    """The key whose value `text` ends in: the TOML table and key, or the JSON key."""
    if not toml:
        keys = re.findall(r'"((?:[^"\\]|\\.)*)"\s*:', text)
        return keys[-1] if keys else None
    tables = re.findall(r"^\s*\[\[?\s*([^\]]+?)\s*\]", text, flags=re.MULTILINE)
    keys = re.findall(r"^\s*([\w\-.\"']+)\s*=", text, flags=re.MULTILINE)
    parts = [*tables[-1:], *keys[-1:]]
    if tables and keys and text.rfind(tables[-1]) > text.rfind(keys[-1] + " "):
        parts = tables[-1:]  # the key belongs to an earlier table
    return ".".join(parts) or None


def check_depth(data: Any, limit: int = MAX_DEPTH) -> None:
    """Refuse data nested deeper than `limit`, naming the key path (walked without recursion).

    Raises:
        ValueError: too deep.
    """
    stack: list[tuple[Any, tuple[str, ...]]] = [(data, ())]
    while stack:
        value, keys = stack.pop()
        if len(keys) > limit:
            shown = ".".join(keys[:6]) + " ... " + ".".join(keys[-3:])
            raise ValueError(
                f"the spec nests deeper than {limit} levels at {shown}. Accepted: at most "
                f"{limit} levels of tables and lists"
            )
        if isinstance(value, Mapping):
            stack.extend((v, (*keys, str(k))) for k, v in value.items())
        elif isinstance(value, list | tuple):
            stack.extend((v, (*keys, str(i))) for i, v in enumerate(value))


def check_component_names(value: dict[str, ComponentSpec]) -> dict[str, ComponentSpec]:
    """Component names are attribute names of the bridge tree: identifiers that are neither
    private (``_``) nor in the hook namespace (``hook_``), so no component path is a hook name.

    Raises:
        ValueError: naming the bad names and what is accepted.
    """
    bad = [n for n in value if not n.isidentifier() or n.startswith(("_", "hook_"))]
    if bad:
        raise ValueError(
            f"component names {bad} are not accepted: a component name is a Python identifier "
            "(it becomes an attribute, bridge.<name>) that starts with neither '_' nor "
            "'hook_' (those are hook point names: a component 'hook_x' would collide with "
            "the hook point of that name)"
        )
    return value


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
