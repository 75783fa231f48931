"""``AmortizedNormal``: an encoder-network guide for latents local to a data plate (the VAE guide).

For each element ``i`` of a data plate the guide is a diagonal Gaussian whose parameters are the
output of a network applied to that element's data (Kingma & Welling 2014; Rezende, Mohamed &
Wierstra 2014; MATH.md §1 and §3)::

    q_phi(z_i | x_i) = Normal(mu_phi(x_i), diag sigma_phi(x_i)^2),
    z_i = mu_phi(x_i) + sigma_phi(x_i) * eps_i,   eps_i ~ N(0, I)        (reparameterized)

One network serves every data point ("amortized inference"): the number of variational
parameters does not grow with N, and a minibatch only runs the encoder on its own rows.

**What the encoder returns.**  ``encoder(x_batch)`` may return

* a pair ``(loc, scale)``: used as is (``scale`` must be positive), or, with
  ``scale_transform="softplus"`` / ``"exp"``, ``(loc, raw)`` with ``scale = softplus(raw)``;
* a single tensor whose last dim holds ``[loc, raw]`` (two halves): ``scale = softplus(raw)``
  (or the chosen ``scale_transform``); with ``event_dim=0`` a ``(B, 2)`` output gives a scalar
  latent per element.

``min_scale`` is added to the scale.  The first dim of ``loc`` runs over the plate's elements in
the batch; the other dims are the latent's event shape (``event_dim`` of them, all by default).

**The plate.**  The guide opens ``pyro.plate(plate, size, subsample_size=..., dim=dim)`` itself and
samples ``site`` inside it; the model must sample ``site`` in a plate of the same name.  In Pyro
the guide runs first, so *its* plate picks the minibatch indices and the model's plate replays
them (same scale ``size / batch``).  The data come from the guide's arguments (the model's):
``data=0`` is the first positional argument, ``data="x"`` a keyword argument, or a callable
``data(*args, **kwargs)``.  If the data have ``size`` rows, the plate subsamples them with
``subsample_size`` (an int, or the name of a keyword argument, or a callable); if they have fewer
rows, they *are* the minibatch (the model scales by ``size / len(data)``) and are encoded whole.
A name given for ``size`` or ``subsample_size`` is looked up among the *keyword* arguments only:
call ``svi.step(x, num_data=N)``, not ``svi.step(x, N)`` (or pass a callable).

**Path-derivative estimators (STL, DReG).**  The particle engine holds the encoder's weights
constant in log q like any guide's (:func:`pyro_elbo.engine.particles.log_q_with_constant_params`):
``log q_{stop(phi)}(z)`` depends on ``phi`` only through ``z``.  At the exact posterior the
STL/DReG gradient then has zero variance (``tests/test_guides.py``).  The weights are registered
in Pyro's param store under ``"{name}$$${parameter}"`` (as ``pyro.module`` does), so
``pyro.infer.SVI`` optimizes them.
"""

from __future__ import annotations

import numbers
from collections.abc import Callable

import pyro
import pyro.distributions as dist
import torch
from torch import nn
from torch.nn import functional as F

__all__ = ["AmortizedNormal"]

_TRANSFORMS = {"softplus": F.softplus, "exp": torch.exp}


class AmortizedNormal(nn.Module):
    """Amortized diagonal-Normal guide ``q(z_i | x_i) = N(mu(x_i), sigma(x_i)^2)`` for one site.

    :param nn.Module encoder: maps a batch of data ``(B, ...)`` to ``(loc, scale)``, or to one
        tensor ``(..., 2 * d)`` of ``[loc, raw scale]`` (see the module docstring).
    :param str site: the latent sample site (local to the plate) in the model.
    :param str plate: the name of the model's data plate.
    :param data: where the plate's data are in the model's arguments: a position (int), a keyword
        (str), or a callable ``data(*args, **kwargs) -> tensor``.  Rows run over the plate.
    :param size: the plate's full size: ``None`` (the number of rows of the data), an int, a
        keyword-argument name, or a callable ``size(*args, **kwargs)``.
    :param subsample_size: minibatch size drawn by the plate from full data (``None``: no
        subsampling), an int, a keyword-argument name, or a callable.
    :param int dim: the plate's dim (default -1).
    :param event_dim: number of event dims of the latent (default: every dim of ``loc`` after the
        first).
    :param scale_transform: ``None`` (a pair's second output is the scale), ``"softplus"``,
        ``"exp"`` or a callable applied to the raw scale.  Default: ``None`` for a pair, softplus
        for a single tensor.
    :param float min_scale: added to the scale (default 0).
    :param str name: prefix of the encoder's parameters in the param store (default
        ``"amortized_{site}"``).
    """

    def __init__(
        self,
        encoder: nn.Module,
        *,
        site: str = "z",
        plate: str = "data",
        data: int | str | Callable = 0,
        size: int | str | Callable | None = None,
        subsample_size: int | str | Callable | None = None,
        dim: int = -1,
        event_dim: int | None = None,
        scale_transform: str | Callable | None = "auto",
        min_scale: float = 0.0,
        name: str | None = None,
    ):
        super().__init__()
        if not isinstance(encoder, nn.Module):
            raise TypeError(
                f"encoder must be a torch.nn.Module mapping the data batch to (loc, scale), got "
                f"{type(encoder).__name__}; wrap a function in an nn.Module"
            )
        for arg, value in (("site", site), ("plate", plate)):
            if not isinstance(value, str) or not value:
                raise ValueError(f"{arg} must be a non-empty site/plate name, got {value!r}")
        if not (isinstance(data, (str, Callable)) or _is_int(data)):
            raise ValueError(
                f"data must be a positional index (int), a keyword name (str) or a callable "
                f"data(*args, **kwargs), got {data!r}"
            )
        if not _is_int(dim) or dim > -1:
            raise ValueError(f"dim must be a negative integer (the plate's dim), got {dim!r}")
        if event_dim is not None and (not _is_int(event_dim) or event_dim < 0):
            raise ValueError(f"event_dim must be a non-negative integer or None, got {event_dim!r}")
        if not (
            scale_transform in (None, "auto")
            or scale_transform in _TRANSFORMS
            or callable(scale_transform)
        ):
            raise ValueError(
                f"scale_transform must be None, 'softplus', 'exp' or a callable, got "
                f"{scale_transform!r}"
            )
        if isinstance(min_scale, bool) or not isinstance(min_scale, numbers.Real) or min_scale < 0:
            raise ValueError(f"min_scale must be a non-negative number, got {min_scale!r}")
        name = f"amortized_{site}" if name is None else name
        if not isinstance(name, str) or "$$$" in name:
            raise ValueError(f"name must be a string without '$$$', got {name!r}")
        self.encoder = encoder
        self.site, self.plate, self.data = site, plate, data
        self.size, self.subsample_size, self.dim = size, subsample_size, int(dim)
        self.event_dim = event_dim
        self.scale_transform = scale_transform
        self.min_scale = float(min_scale)
        self.name = name

    # ------------------------------------------------------------------ the guide
    def forward(self, *args, **kwargs):
        """Sample ``site`` for the plate's (mini)batch; returns the sampled value."""
        self._register()
        x = self._data(args, kwargs)
        size = self._resolve("size", self.size, args, kwargs, default=x.shape[0])
        subsample_size = self._resolve("subsample_size", self.subsample_size, args, kwargs)
        plate_kwargs = {"dim": self.dim}
        if x.shape[0] == size:
            plate_kwargs["subsample_size"] = subsample_size
        elif x.shape[0] < size:
            if subsample_size is not None and subsample_size != x.shape[0]:
                raise ValueError(
                    f"AmortizedNormal({self.site!r}): the data have {x.shape[0]} rows, fewer than "
                    f"the plate's size {size}, so they are taken as the minibatch, but "
                    f"subsample_size is {subsample_size}. Pass the full data, or drop "
                    "subsample_size."
                )
            plate_kwargs["subsample"] = torch.arange(x.shape[0], device=x.device)
        else:
            raise ValueError(
                f"AmortizedNormal({self.site!r}): the data have {x.shape[0]} rows but the plate "
                f"{self.plate!r} has size {size}; rows must run over the plate's elements."
            )
        with pyro.plate(self.plate, size, **plate_kwargs) as idx:
            whole = "subsample" in plate_kwargs or subsample_size in (None, size)
            batch = x if whole else x.index_select(0, idx.to(x.device))
            return pyro.sample(self.site, self._distribution(batch, plate_dims=True))

    # ------------------------------------------------------------------ public helpers
    def encode(self, x: torch.Tensor):
        """``(loc, scale)`` of q for a batch of data (rows over the plate), with gradients."""
        raw = self.encoder(x)
        if isinstance(raw, (tuple, list)):
            if len(raw) != 2:
                raise ValueError(
                    f"AmortizedNormal({self.site!r}): the encoder returned {len(raw)} outputs; it "
                    "must return (loc, scale) or one tensor of [loc, raw scale]"
                )
            loc, second = raw
            transform = None if self.scale_transform == "auto" else self.scale_transform
        elif isinstance(raw, torch.Tensor):
            if raw.dim() < 2 or raw.shape[-1] % 2:
                raise ValueError(
                    f"AmortizedNormal({self.site!r}): the encoder returned one tensor of shape "
                    f"{tuple(raw.shape)}; its last dim must hold [loc, raw scale] (an even size), "
                    "or return a (loc, scale) pair"
                )
            if self.event_dim == 0 and raw.shape[-1] == 2:  # a scalar latent per element
                loc, second = raw[..., 0], raw[..., 1]
            else:
                loc, second = raw.chunk(2, dim=-1)
            transform = "softplus" if self.scale_transform == "auto" else self.scale_transform
        else:
            raise TypeError(
                f"AmortizedNormal({self.site!r}): the encoder returned a "
                f"{type(raw).__name__}; it must return (loc, scale) or one tensor"
            )
        if transform is not None:
            second = _TRANSFORMS.get(transform, transform)(second)
        scale = second + self.min_scale if self.min_scale else second
        if loc.shape != scale.shape:
            raise ValueError(
                f"AmortizedNormal({self.site!r}): loc has shape {tuple(loc.shape)} but scale has "
                f"shape {tuple(scale.shape)}"
            )
        if loc.dim() < 1 or loc.shape[0] != x.shape[0]:
            raise ValueError(
                f"AmortizedNormal({self.site!r}): the encoder's outputs have shape "
                f"{tuple(loc.shape)}; their first dim must run over the {x.shape[0]} rows of the "
                "batch"
            )
        if not bool((scale > 0).all()):
            raise ValueError(
                f"AmortizedNormal({self.site!r}): the encoder returned a scale <= 0 (or NaN). "
                "Return a positive scale, or pass scale_transform='softplus' to map raw outputs."
            )
        return loc, scale

    def posterior_distributions(self, *args, **kwargs):
        """``{site: q(z_i | x_i)}`` for every row of the data (no subsampling), detached.

        The distribution has batch shape ``(N,)`` and the latent's event shape.
        """
        x = self._data(args, kwargs)
        with torch.no_grad():
            return {self.site: self._distribution(x, plate_dims=False)}

    # ------------------------------------------------------------------ internals
    def _distribution(self, x, plate_dims: bool):
        loc, scale = self.encode(x)
        event_dim = loc.dim() - 1 if self.event_dim is None else self.event_dim
        if event_dim > loc.dim() - 1:
            raise ValueError(
                f"AmortizedNormal({self.site!r}): event_dim={event_dim} but the encoder's loc "
                f"has shape {tuple(loc.shape)} (batch first)"
            )
        if plate_dims:
            # put the rows at the plate's dim: (B, 1, ..., 1, *event)
            batch_rest = loc.shape[1 : loc.dim() - event_dim]
            if batch_rest:
                raise ValueError(
                    f"AmortizedNormal({self.site!r}): loc has shape {tuple(loc.shape)} with "
                    f"event_dim={event_dim}, which leaves batch dims {tuple(batch_rest)} beyond "
                    "the plate's; declare them as event dims (event_dim=None)"
                )
            ones = (1,) * (-self.dim - 1)
            shape = loc.shape[:1] + ones + loc.shape[1:]
            loc, scale = loc.reshape(shape), scale.reshape(shape)
        fn = dist.Normal(loc, scale)
        return fn.to_event(event_dim) if event_dim else fn

    def _data(self, args, kwargs) -> torch.Tensor:
        spec = self.data
        try:
            if callable(spec):
                x = spec(*args, **kwargs)
            elif isinstance(spec, str):
                x = kwargs[spec]
            else:
                x = args[spec]
        except (IndexError, KeyError) as error:
            where = f"keyword argument {spec!r}" if isinstance(spec, str) else f"argument {spec}"
            raise ValueError(
                f"AmortizedNormal({self.site!r}): data={spec!r} names the model's {where}, but "
                f"the guide was called with {len(args)} positional argument(s) and keywords "
                f"{sorted(kwargs)}. Pass data= the position or keyword of the observed batch."
            ) from error
        if not isinstance(x, torch.Tensor) or x.dim() < 1:
            raise ValueError(
                f"AmortizedNormal({self.site!r}): the data must be a tensor with rows over the "
                f"plate {self.plate!r}, got {type(x).__name__}"
            )
        return x

    def _resolve(self, what, spec, args, kwargs, default=None):
        if spec is None:
            return default
        if isinstance(spec, str):
            value = kwargs.get(spec)
            return default if value is None and what == "size" else value
        if callable(spec):
            return spec(*args, **kwargs)
        return spec

    def _register(self):
        """Register the encoder's trainable weights in the param store (as ``pyro.module``)."""
        store = pyro.get_param_store()
        for pname, param in self.encoder.named_parameters():
            if not param.requires_grad:
                continue  # frozen, or swapped for a detached copy by the STL/DReG replay
            full = f"{self.name}$$$encoder.{pname}"
            stored = store._params.get(full)
            if stored is not None and stored is not param:
                raise ValueError(
                    f"AmortizedNormal({self.site!r}): the param store already holds {full!r} "
                    "from another network. Give this guide a different name=, or call "
                    "pyro.clear_param_store() first (load saved weights with "
                    "guide.load_state_dict)."
                )
            pyro.param(full, param)


def _is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)
