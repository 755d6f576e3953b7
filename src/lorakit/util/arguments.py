"""Argument checks at the public boundary: a wrong type or an out-of-range number is a :class:`ConfigError` that
names the argument, raised before the function touches anything.

``@checked`` reads the function's own type hints, so a signature is documented and enforced in one place::

    @checked(rank=Range(ge=1), density=Range(gt=0, le=1))
    def combine(model: nn.Module, weights: Mapping[str, float], how: str = "svd", rank: int | None = None,
                density: float | None = None) -> ...

What a hint accepts: a class (``isinstance``; ``bool`` is not an ``int`` and neither is a ``float``; a ``float``
takes an ``int`` but never NaN or infinity), ``X | None``, ``Literal[...]``, ``Mapping[K, V]`` / ``dict[K, V]``
(keys and values checked), ``Sequence[T]`` / ``list[T]`` / ``tuple[T, ...]`` (a string is not a sequence of
strings here), ``Callable``, ``type[X]`` and ``Any``. Hints that cannot be resolved are not checked.
"""

from __future__ import annotations

import collections.abc as abc
import functools
import inspect
import math
import numbers
import os
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from lorakit.errors import ConfigError

F = TypeVar("F", bound=Callable[..., Any])
_MISSING = object()


@dataclass(frozen=True)
class Range:
    """Bounds of a numeric argument (``None``: unbounded on that side)."""

    gt: float | None = None
    ge: float | None = None
    lt: float | None = None
    le: float | None = None

    def problem(self, value: float) -> str | None:
        for bound, ok, word in ((self.gt, lambda b: value > b, ">"), (self.ge, lambda b: value >= b, ">="),
                                (self.lt, lambda b: value < b, "<"), (self.le, lambda b: value <= b, "<=")):
            if bound is not None and not ok(bound):
                return f"must be {word} {bound:g}"
        return None


def _describe(hint: Any) -> str:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is type(None) or hint is None:
        return "None"
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in args)
    if origin is typing.Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if origin is not None:
        if origin is os.PathLike:
            return "a path"
        if origin in (abc.Mapping, abc.MutableMapping, dict):
            return f"a mapping {{{_describe(args[0])}: {_describe(args[1])}}}" if len(args) == 2 else "a mapping"
        if origin is abc.Callable:
            return "a callable"
        name = {list: "a list", tuple: "a tuple"}.get(origin, f"a {getattr(origin, '__name__', origin)}")
        items = [_describe(a) for a in args if a is not Ellipsis]
        return name + (f" of {' or '.join(dict.fromkeys(items))}" if items else "")
    if isinstance(hint, type):
        return {"str": "a string", "int": "an integer", "float": "a number", "bool": "True or False",
                "Module": "a torch.nn.Module", "Tensor": "a torch.Tensor"}.get(hint.__name__, hint.__name__)
    return str(hint)


def _matches(value: Any, hint: Any) -> bool:
    """Whether ``value`` fits ``hint`` (unknown hint forms fit everything)."""
    if hint is Any or hint is object:
        return True
    if hint is None or hint is type(None):
        return value is None
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_matches(value, a) for a in args)
    if origin is typing.Literal:
        return any(value == a and type(value) is type(a) for a in args)
    if origin is typing.Annotated:
        return _matches(value, args[0])
    if origin is type:
        return isinstance(value, type) and (not args or not isinstance(args[0], type) or issubclass(value, args[0]))
    if origin in (abc.Mapping, abc.MutableMapping, dict):
        if not isinstance(value, abc.Mapping):
            return False
        k, v = args if len(args) == 2 else (Any, Any)
        return all(_matches(key, k) and _matches(val, v) for key, val in value.items())
    if origin in (abc.Sequence, list, abc.Iterable, abc.Collection):
        if isinstance(value, (str, bytes)) or not isinstance(value, origin if origin is list else abc.Iterable):
            return False
        if origin is abc.Sequence and not isinstance(value, abc.Sequence):
            return False
        if not isinstance(value, abc.Sized):  # a one-shot iterator: its items cannot be checked here
            return True
        return not args or all(_matches(x, args[0]) for x in value)
    if origin is tuple:
        if not isinstance(value, tuple):
            return False
        if len(args) == 2 and args[1] is Ellipsis:
            return all(_matches(x, args[0]) for x in value)
        return not args or (len(args) == len(value) and all(_matches(x, a) for x, a in zip(value, args)))
    if origin is abc.Callable or hint is abc.Callable:
        return callable(value)
    if origin is os.PathLike or hint is os.PathLike:
        return isinstance(value, os.PathLike)
    if origin is not None:  # some other generic: check the class alone
        return not isinstance(origin, type) or isinstance(value, origin)
    if not isinstance(hint, type):
        return True
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, numbers.Integral) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, numbers.Real) and not isinstance(value, bool)
    return isinstance(value, hint)


def _takes_path(hint: Any) -> bool:
    """Whether ``hint`` names a filesystem path (``os.PathLike`` among its members)."""
    if hint is os.PathLike or typing.get_origin(hint) is os.PathLike:
        return True
    return any(_takes_path(a) for a in typing.get_args(hint))


def _hints(func: Callable[..., Any]) -> dict[str, Any]:
    """``func``'s parameter hints, resolved one by one (one that cannot be resolved is left out)."""
    raw = getattr(func, "__annotations__", {})
    out = {}
    for name, ann in raw.items():
        if name == "return":
            continue
        if isinstance(ann, str):
            try:
                ann = eval(ann, func.__globals__)  # noqa: S307 - the module's own annotation text
            except Exception:  # a name only imported for type checking
                continue
        out[name] = ann
    return out


def check_argument(where: str, name: str, value: Any, hint: Any = Any, bounds: Range | None = None) -> None:
    """Refuse ``value`` for argument ``name`` of ``where`` unless it fits ``hint``, is finite (numbers) and lies
    in ``bounds``.

    Raises:
        ConfigError: naming ``where``, ``name``, what was expected and what came.
    """
    if not _matches(value, hint):
        shown = repr(value)
        shown = shown if len(shown) <= 60 else shown[:57] + "..."
        raise ConfigError(f"{where}: argument {name!r} must be {_describe(hint)}, got {type(value).__name__} "
                          f"{shown}")
    if isinstance(value, str) and _takes_path(hint):
        if not value.strip():
            raise ConfigError(f"{where}: argument {name!r} is an empty path")
        if "\x00" in value:
            raise ConfigError(f"{where}: argument {name!r} holds a NUL character, which no path can")
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"{where}: argument {name!r} must be a finite number, got {value}")
        problem = bounds.problem(float(value)) if bounds is not None else None
        if problem:
            raise ConfigError(f"{where}: argument {name!r} {problem}, got {value}")


def checked(func: F | None = None, /, **bounds: Range) -> Any:
    """Decorator: check every argument of ``func`` against its type hint (and ``bounds``) on each call.

    ``**kwargs`` parameters are not checked here (the function validates its own options).
    """

    def wrap(f: F) -> F:
        sig = inspect.signature(f)
        unknown = set(bounds) - set(sig.parameters)
        if unknown:
            raise TypeError(f"checked({f.__qualname__}): no parameter(s) {sorted(unknown)}")
        where = f"{f.__qualname__.removesuffix('.__init__')}()"
        state: dict[str, Any] = {}

        @functools.wraps(f)
        def inner(*args: Any, **kwargs: Any) -> Any:
            if "hints" not in state:  # resolved on first use: every module is imported by then
                state["hints"] = _hints(f)
            try:
                bound = sig.bind(*args, **kwargs)
            except TypeError as e:
                raise ConfigError(f"{where}: {e}") from None
            hints = state["hints"]
            for name, value in bound.arguments.items():
                p = sig.parameters[name]
                if p.kind in (p.VAR_KEYWORD, p.VAR_POSITIONAL) or name in ("self", "cls"):
                    continue
                check_argument(where, name, value, hints.get(name, Any), bounds.get(name))
            return f(*args, **kwargs)

        return typing.cast(F, inner)

    return wrap(func) if func is not None else wrap


__all__ = ["Range", "check_argument", "checked"]
