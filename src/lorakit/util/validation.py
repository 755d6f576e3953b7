"""One way to turn a pydantic ``ValidationError`` into the one-line messages lorakit prints."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

from lorakit.errors import ConfigError

M = TypeVar("M", bound=BaseModel)


def _fields_at(root: type[BaseModel], loc: Sequence[str]) -> list[str]:
    """The field names of the (nested) model at ``loc`` below ``root`` (empty when not a model)."""
    cls: Any = root
    for part in loc:
        field = getattr(cls, "model_fields", {}).get(part)
        if field is None:
            return []
        cls = field.annotation
    return sorted(getattr(cls, "model_fields", {}))


def problems(e: ValidationError, root: type[BaseModel], *, unknown: str = "unknown key") -> list[str]:
    """``field.path: problem`` for each error; unknown keys (called ``unknown``) list the allowed ones."""
    out = []
    for err in e.errors():
        loc = [str(p) if str(p) else "''" for p in err["loc"]]
        field = ".".join(loc) or "<config>"
        msg = err["msg"]
        if err["type"] == "extra_forbidden":
            allowed = _fields_at(root, loc[:-1])
            msg = unknown + (f" (allowed: {', '.join(allowed)})" if allowed else "")
        elif err["type"] == "missing":
            msg = "required field is missing"
        elif err["type"] == "model_type":
            msg = f"must be a mapping with keys {', '.join(_fields_at(root, loc))}"
        out.append(f"{field}: {msg}")
    return out


def parse(cls: type[M], data: Mapping[str, Any], what: str, *, unknown: str = "unknown key") -> M:
    """``cls(**data)``, or :class:`ConfigError` ``"{what}: field: problem; ..."`` listing every problem."""
    if not isinstance(data, Mapping):
        raise ConfigError(f"{what}: expected a mapping, got {type(data).__name__}")
    try:
        return cls(**data)
    except ValidationError as e:
        raise ConfigError(f"{what}: " + "; ".join(problems(e, cls, unknown=unknown))) from None
    except TypeError as e:  # non-string keys
        raise ConfigError(f"{what}: {e}") from None
