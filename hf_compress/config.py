"""The contract every method's config follows (in the manner of peft's one config class per method).

A method's config is a dataclass that also derives from `MethodConfig`: `validate()` says in one line what is wrong
with a field before any work starts, `resolve(device)` returns a copy with every "auto" default replaced by what it
means on that device (called once, by the method's entry point), and `to_dict()` / `from_dict()` round-trip the
config through the JSON provenance record saved with the model.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

from .errors import HFCompressError

C = TypeVar("C", bound="MethodConfig")


class MethodConfig:
    """Mixin of the method config dataclasses: validation, "auto" resolution and a JSON-able dict form."""

    def validate(self) -> None:
        """Raises `HFCompressError` naming the first bad field; the default accepts everything."""

    def resolve(self: C, device=None) -> C:
        """A copy with every "auto" default resolved for `device`; the default has none to resolve."""
        return dataclasses.replace(self)

    def to_dict(self) -> dict[str, Any]:
        """The fields as JSON-able values (tuples as lists, nested configs as dicts, paths as strings)."""
        return {field.name: _plain(getattr(self, field.name)) for field in dataclasses.fields(self)}

    @classmethod
    def from_dict(cls: type[C], data: dict[str, Any]) -> C:
        """The config `to_dict` described; unknown keys are refused (they would be silently ignored otherwise)."""
        fields = {field.name: field for field in dataclasses.fields(cls) if field.init}
        unknown = sorted(set(data) - set(fields))
        if unknown:
            raise HFCompressError(f"{cls.__name__} has no field(s) {unknown}; known: {sorted(fields)}")
        hints = typing.get_type_hints(cls)
        return cls(**{name: _typed(hints[name], value) for name, value in data.items()})


def _plain(value: Any) -> Any:
    if isinstance(value, MethodConfig):
        return value.to_dict()
    if isinstance(value, (tuple, list)):
        return [_plain(item) for item in value]
    if isinstance(value, dict):
        return {key: _plain(item) for key, item in value.items()}
    if isinstance(value, Path):
        return str(value)
    return value


def _typed(hint: Any, value: Any) -> Any:
    """`value` read back from JSON as the field's annotated type (only where JSON loses it: tuples, configs)."""
    if value is None:
        return None
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        options = [arg for arg in typing.get_args(hint) if arg is not type(None)]
        return _typed(options[0], value) if len(options) == 1 else value
    if origin is tuple and isinstance(value, list):
        args = typing.get_args(hint)
        inner = args[0] if args else Any
        return tuple(_typed(inner, item) for item in value)
    if origin is list and isinstance(value, list):
        args = typing.get_args(hint)
        return [_typed(args[0], item) for item in value] if args else list(value)
    if isinstance(hint, type) and issubclass(hint, MethodConfig) and isinstance(value, dict):
        return hint.from_dict(value)
    return value
