"""Flashbax's buffer objects are frozen dataclasses whose *fields* are the pure functions
(`init`, `add`, `sample`, `can_sample`, `set_priorities`, ...), and published programs rebind
them (the PureJaxRL pattern):

    buffer = buffer.replace(init=jax.jit(buffer.init),
                            add=jax.jit(buffer.add, donate_argnums=0), ...)

Ours are frozen dataclasses of a static configuration whose functions are methods.
`FunctionFields` gives them the same `replace`: a replaced function is stored in the
(hashable, compared) field `overrides` and shadows the method of the same name on the new
instance, so `new.add(...)` calls the jitted function and every view that calls `buffer.add`
uses it too. Views that need the configuration instead of the functions (`shard`) refuse a
buffer with replaced functions, naming them.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, ClassVar, TypeVar

Overrides = tuple[tuple[str, Callable[..., Any]], ...]
_T = TypeVar("_T", bound="FunctionFields")


@dataclasses.dataclass(frozen=True)
class FunctionFields:
    """Mixin for a frozen dataclass: `replace(**fields)` for its function fields and its
    dataclass fields, as Flashbax's `chex.dataclass.replace`.

    `function_fields` (per class) names the methods that may be replaced. `overrides` holds
    the replaced ones as `(name, function)` pairs, sorted by name (so equal replacements give
    equal, equally hashed buffers); it is keyword-only so that subclasses keep their
    positional fields.
    """

    function_fields: ClassVar[tuple[str, ...]] = ()
    overrides: Overrides = dataclasses.field(default=(), kw_only=True, repr=False)

    def __post_init__(self) -> None:
        for name, fn in self.overrides:
            if name not in self.function_fields:
                raise TypeError(
                    f"{type(self).__name__}: {name!r} is not a function field "
                    f"(function fields: {', '.join(self.function_fields)})"
                )
            if not callable(fn):
                raise TypeError(f"{type(self).__name__}.replace: {name} must be callable, got "
                                f"{type(fn).__name__}")
            # An instance attribute shadows the method of the same name (methods are
            # non-data descriptors); frozen, so set it the way dataclasses do.
            object.__setattr__(self, name, fn)

    @property
    def replaced(self) -> tuple[str, ...]:
        """Names of the functions replaced with `replace` (empty for a factory's buffer)."""
        return tuple(name for name, _ in self.overrides)

    def replace(self: _T, **fields: Any) -> _T:
        """A copy with `fields` replaced: function fields (e.g. `add=jax.jit(buffer.add,
        donate_argnums=0)`) and/or dataclass fields. Unknown names raise TypeError."""
        data = {f.name for f in dataclasses.fields(self) if f.name != "overrides"}
        unknown = sorted(set(fields) - data - set(self.function_fields))
        if unknown:
            raise TypeError(
                f"{type(self).__name__}.replace: unknown field(s) {', '.join(unknown)} "
                f"(function fields: {', '.join(self.function_fields)}; "
                f"configuration: {', '.join(sorted(data))})"
            )
        functions = dict(self.overrides)
        functions.update({k: v for k, v in fields.items() if k in self.function_fields})
        changes = {k: v for k, v in fields.items() if k in data}
        return dataclasses.replace(self, **changes, overrides=tuple(sorted(functions.items())))


def require_unreplaced(buffer: Any, what: str) -> None:
    """ValueError naming the replaced functions, for a view that works on the buffer's
    configuration (`buffer.core`, `buffer.layout`) rather than its functions."""
    replaced = getattr(buffer, "replaced", ())
    if replaced:
        raise ValueError(
            f"{what}: the buffer's {', '.join(replaced)} were replaced with "
            f"buffer.replace(...), and {what} works from the buffer's configuration, so it "
            f"would not call them; pass the buffer as the make_* factory returned it (and jit "
            f"the methods of the result instead)"
        )
