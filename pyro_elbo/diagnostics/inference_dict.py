r"""The ArviZ groups as plain numpy (:class:`InferenceDict`), their hand-off to ArviZ, and the
files that move them between environments.

**Versions.** The groups are built as plain numpy (:class:`InferenceDict`, no ArviZ import), then
handed to ``arviz.from_dict`` (ArviZ < 1, an ``InferenceData``) or ``arviz_base.from_dict``
(ArviZ >= 1, an ``xarray.DataTree``), by the installed version of the ``arviz`` distribution.
ArviZ 1.x needs Python >= 3.12; :meth:`InferenceDict.save` / :meth:`InferenceDict.load` move the
groups between environments.  This module imports neither torch nor pyro, so it runs where only
ArviZ is installed (with its siblings :mod:`.psis` and :mod:`.loo`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from pyro_elbo.diagnostics.psis import arviz_version

__all__ = ["LOSS_GROUP", "SAMPLE_DIMS", "InferenceDict"]

#: Sample dims of every draw-indexed group.
SAMPLE_DIMS = ("chain", "draw")
#: The group of the loss trace (dim ``step``).
LOSS_GROUP = "optimization"


# --------------------------------------------------------------------------- numpy groups
@dataclass
class InferenceDict:
    """The ArviZ groups as plain numpy: ``groups[group][var]`` is an array whose leading dims
    are ``(chain, draw)`` (except ``observed_data`` and the loss group), ``dims[var]`` names the
    remaining dims, ``coords[dim]`` gives index values, ``attrs[group]`` the group attributes.
    """

    groups: dict[str, dict[str, np.ndarray]]
    dims: dict[str, list[str]] = field(default_factory=dict)
    coords: dict[str, list] = field(default_factory=dict)
    attrs: dict[str, dict] = field(default_factory=dict)

    def to_arviz(self, return_type: str | None = None):
        """``InferenceData`` (ArviZ < 1) or ``xarray.DataTree`` (ArviZ >= 1).

        :param return_type: ``"inferencedata"`` or ``"datatree"`` to override the choice made
            from the installed ArviZ version (on 0.x, ``"datatree"`` gives
            ``InferenceData.to_datatree()``; 1.x has no InferenceData).
        """
        if return_type not in (None, "inferencedata", "datatree"):
            raise ValueError(
                f"return_type must be None, 'inferencedata' or 'datatree', got {return_type!r}"
            )
        major = arviz_version()[0]
        if return_type is None:
            return_type = "datatree" if major >= 1 else "inferencedata"
        if major >= 1:
            tree = self._datatree()
            if return_type == "inferencedata":
                raise ValueError("ArviZ >= 1 has no InferenceData; use return_type='datatree'")
            return tree
        idata = self._inference_data()
        return idata.to_datatree() if return_type == "datatree" else idata

    def _sampled_groups(self):
        return {g: v for g, v in self.groups.items() if g != LOSS_GROUP and v}

    def _loss_dataset(self):
        import xarray as xr

        losses = self.groups.get(LOSS_GROUP)
        if not losses:
            return None
        steps = np.arange(len(next(iter(losses.values()))))
        data = {name: (("step",), np.asarray(v)) for name, v in losses.items()}
        return xr.Dataset(data, coords={"step": steps}, attrs=self.attrs.get(LOSS_GROUP, {}))

    def _inference_data(self):
        import arviz as az

        groups = self._sampled_groups()
        attrs = {f"{g}_attrs": self.attrs[g] for g in groups if g in self.attrs}
        idata = az.from_dict(**groups, dims=self.dims, coords=self.coords, **attrs)
        losses = self._loss_dataset()
        if losses is not None:
            idata.add_groups({LOSS_GROUP: losses})
        return idata

    def _datatree(self):
        import arviz_base

        groups = self._sampled_groups()
        attrs = {g: self.attrs[g] for g in groups if g in self.attrs}
        tree = arviz_base.from_dict(groups, dims=self.dims, coords=self.coords, attrs=attrs)
        losses = self._loss_dataset()
        if losses is not None:
            tree[LOSS_GROUP] = losses
        return tree

    # ------------------------------------------------------------------ files
    def save(self, path) -> Path:
        """Write ``<path>.npz`` (the arrays, and the metadata) and ``<path>.json`` (dims, coords,
        attrs, readable); returns the npz path.  :meth:`load` reads them back without torch or
        pyro.

        ``path`` is a name, not a file with a suffix to replace: ``save("fit.seed1")`` writes
        ``fit.seed1.npz`` (a trailing ``.npz`` or ``.json`` is dropped).  Each file is written
        to a temporary file of its own and renamed over the old one, so a reader never sees a
        torn file; the npz carries its own copy of the metadata, so :meth:`load` never pairs
        arrays with the metadata of another save.
        """
        base = _base_path(path)
        arrays = {f"{g}/{v}": np.asarray(a) for g, vs in self.groups.items() for v, a in vs.items()}
        meta = json.dumps(
            {
                "groups": {g: list(vs) for g, vs in self.groups.items()},
                "dims": self.dims,
                "coords": {d: np.asarray(c).tolist() for d, c in self.coords.items()},
                "attrs": self.attrs,
            },
            indent=1,
            default=_json_default,
        )
        npz = base.with_name(base.name + ".npz")
        _write_atomic(npz, lambda handle: np.savez(handle, **arrays, **{_META: np.array(meta)}))
        _write_atomic(base.with_name(base.name + ".json"), lambda h: h.write(meta.encode()))
        return npz

    @classmethod
    def load(cls, path) -> InferenceDict:
        """Read what :meth:`save` wrote (``path`` as given to it, or the npz path)."""
        base = _base_path(path)
        npz = base.with_name(base.name + ".npz")
        with np.load(npz, allow_pickle=False) as arrays:
            if _META in arrays.files:
                meta = json.loads(str(arrays[_META]))
            else:  # written before the metadata was stored in the npz
                meta = json.loads(base.with_name(base.name + ".json").read_text())
            groups = {g: {v: arrays[f"{g}/{v}"] for v in vs} for g, vs in meta["groups"].items()}
        return cls(groups, meta["dims"], meta["coords"], meta["attrs"])


#: the npz key of the metadata (group/variable keys always hold a "/")
_META = "__meta__"


def _base_path(path) -> Path:
    path = Path(path)
    return path.with_suffix("") if path.suffix in (".npz", ".json") else path


def _write_atomic(path: Path, write) -> None:
    import os
    import tempfile

    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def _json_default(value):
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    return str(value)
