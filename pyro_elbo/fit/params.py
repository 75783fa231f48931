"""The parameters ``fit`` optimizes: Pyro's param store, plus module-local parameters.

With ``pyro.settings.set(module_local_params=True)`` (which Pyro's ``svi_torch.py`` example
recommends) a ``PyroModule``'s parameters live in the module, not in the global param store; the
module still announces each one with a ``param`` message when it reads it.  :class:`ParamIndex`
looks like the param store to ``fit`` (``name in index``, ``index[name]``, ``keys()``,
``len()``) and adds the parameters those messages name that the store does not hold, read
from the traces ``fit`` captures (:meth:`ParamIndex.add`).
"""

from __future__ import annotations

import weakref

import torch
from torch.distributions import constraints, transform_to

__all__ = ["ParamIndex"]


class ParamIndex:
    """Pyro's param store and the module-local parameters seen in captured traces."""

    def __init__(self, store):
        self._store = store
        self._local: dict[str, tuple[torch.Tensor, object]] = {}

    def add(self, trace) -> None:
        """Record the trainable parameters of ``trace``'s ``param`` sites that the store lacks."""
        for name, site in trace.nodes.items():
            if site["type"] != "param" or name in self._store or name in self._local:
                continue
            value = site["value"]
            unconstrained = getattr(value, "unconstrained", None)
            leaf = unconstrained() if unconstrained is not None else value
            if not isinstance(leaf, torch.Tensor) or not leaf.requires_grad:
                continue
            held = getattr(self._store, "_param_to_name", {})
            if leaf in held or any(leaf is known for known, _ in self._local.values()):
                continue  # the same tensor under another name (e.g. pyro.module's)
            constraint = site["kwargs"].get("constraint", constraints.real)
            self._local[name] = (leaf, constraint)

    def __contains__(self, name) -> bool:
        return name in self._store or name in self._local

    def __getitem__(self, name):
        if name in self._store:
            return self._store[name]
        leaf, constraint = self._local[name]
        value = transform_to(constraint)(leaf)
        if value is not leaf:
            value.unconstrained = weakref.ref(leaf)
        else:
            value = leaf.view_as(leaf)
            value.unconstrained = weakref.ref(leaf)
        return value

    def keys(self) -> list:
        return [*self._store.keys(), *self._local]

    def __len__(self) -> int:
        return len(self._store) + len(self._local)

    def __getattr__(self, attribute):  # anything else is the store's
        return getattr(self._store, attribute)
