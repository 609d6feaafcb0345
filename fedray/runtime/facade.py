"""Actors that expose only their public methods.

Ray turns *every* method of an actor class into a remote method, underscore ones included:
``handle._authorize.remote(...)`` runs a key holder's internal check and returns its
deposits (exponent shares and all), and ``handle._train_many.remote(...)`` trains a
restarted host past the guard in ``train``. So the actors whose handles other parties
hold (client hosts, key holders) are made from a facade: a class with one forwarding
method per *public* method of the real class, which it builds in its own process and
keeps in ``_impl``. A handle then reaches the public methods only, and each of those
applies its own checks. (Ray's own ``__ray_call__`` still runs any function in the
actor: that is the "a Ray handle is code execution" caveat of the threat model,
docs/explanations/threat-model.md.)
"""

from __future__ import annotations

import inspect
from typing import Any


def public_methods(impl: type) -> list[str]:
    """The names of ``impl``'s public methods (plain functions, inherited ones too)."""
    return sorted(
        name
        for name, member in inspect.getmembers(impl, inspect.isfunction)
        if not name.startswith("_")
    )


def public_facade(impl: type) -> type:
    """A class named like ``impl`` whose instances build an ``impl`` with the same
    arguments and forward to it only ``impl``'s public methods (see the module's doc).

    Attribute reads the facade does not have go to the instance (so a function run in
    the actor with ``__ray_call__`` sees the real object's state, as tests need)."""

    def forward(name: str):
        def method(self, *args: Any, **kwargs: Any) -> Any:
            return getattr(self._impl, name)(*args, **kwargs)

        method.__name__ = name
        method.__qualname__ = f"{impl.__name__}.{name}"
        method.__doc__ = getattr(impl, name).__doc__
        return method

    def __init__(self, *args: Any, **kwargs: Any) -> None:  # noqa: N807 - a class body
        self._impl = impl(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:  # noqa: N807
        try:
            target = object.__getattribute__(self, "_impl")
        except AttributeError:
            raise AttributeError(name) from None
        return getattr(target, name)

    def __repr__(self) -> str:  # noqa: N807
        return repr(object.__getattribute__(self, "_impl"))

    namespace: dict[str, Any] = {name: forward(name) for name in public_methods(impl)}
    namespace.update(
        __init__=__init__,
        __getattr__=__getattr__,
        __repr__=__repr__,
        __doc__=impl.__doc__,
        __module__=impl.__module__,
        __qualname__=impl.__qualname__,
        _impl_class=impl,
    )
    return type(impl.__name__, (), namespace)
