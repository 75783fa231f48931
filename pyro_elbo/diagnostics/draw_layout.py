"""Reading ArviZ groups off the particle engine's traces: which sites are latent, deterministic
or observed, each site's per-draw shape and dim names (named after the ``pyro.plate`` s), and
the per-draw numpy arrays of every group (:class:`DrawLayout`)."""

from __future__ import annotations

import math
import numbers
import warnings

import numpy as np

__all__ = ["DrawLayout"]


def _numpy(t) -> np.ndarray:
    import torch

    if isinstance(t, torch.Tensor):
        return t.detach().cpu().numpy()
    return np.asarray(t)


def _strip_leading_ones(shape):
    shape = tuple(shape)
    while shape and shape[0] == 1:
        shape = shape[1:]
    return shape


class DrawLayout:
    """Site kinds, per-draw shapes and dim names, read from one unvectorized engine run.

    A site's per-draw array keeps its event dims and the batch dims of the plates it is in;
    size-1 batch dims that only hold the place of a plate the site is not in (a site in the
    plate at dim -2 only has batch shape ``(N, 1)``) are dropped.
    """

    def __init__(self, model_trace, guide_trace, nesting):
        self.latent, self.deterministic, self.observed = [], [], []
        self.sites = {}
        for name, site in model_trace.nodes.items():
            if site["type"] != "sample":
                continue
            self.sites[name] = site
            if not site["is_observed"]:
                self.latent.append(name)
            elif site["infer"].get("_deterministic"):
                self.deterministic.append(name)
            else:
                self.observed.append(name)
        self.nesting = nesting
        self.shapes, self.dim_names, self.num_batch = {}, {}, {}
        for name in (*self.latent, *self.deterministic, *self.observed):
            self._describe(name)

    def _describe(self, name):
        site = self.sites[name]
        frames = {f.dim: f for f in site["cond_indep_stack"] if f.vectorized}
        if name in self.observed:  # replicates have the distribution's full shape
            shape = tuple(site["fn"].shape())
        else:
            shape = tuple(site["value"].shape)
        num_batch = len(shape) - len(site["fn"].event_shape)
        deterministic = name in self.deterministic
        if deterministic and num_batch == 0:
            # pyro.deterministic's default event_dim makes every dim an event dim: line the
            # dims up with the plate slots from the right, named after plates of matching size
            num_batch = len(shape)
        sizes, names, kept_batch = [], [], 0
        for i, size in enumerate(shape):
            dim = i - num_batch  # negative for batch dims
            frame = frames.get(dim) if dim < 0 else None
            if frame is not None and (frame.size == size or not deterministic):
                label = frame.name
            elif dim < 0 and size == 1 and -dim <= self.nesting:
                continue  # holds the place of a plate the site is not in
            else:
                label = f"{name}_dim_{len(names)}"
            sizes.append(size)
            names.append(label)
            kept_batch += dim < 0
        self.shapes[name] = tuple(sizes)
        self.dim_names[name] = names
        self.num_batch[name] = kept_batch

    def dims(self) -> dict[str, list[str]]:
        return {name: list(names) for name, names in self.dim_names.items()}

    def warn_if_subsampled(self):
        for name in self.observed:
            scale = self.sites[name]["scale"]
            if not (isinstance(scale, numbers.Number) and scale == 1.0):
                warnings.warn(
                    f"observed site {name!r} is scaled (subsampled plate or poutine.scale): the "
                    "log likelihood covers only the minibatch and lp is a scaled estimate. Run "
                    "to_inference_data on the full data (subsample_size=None).",
                    UserWarning,
                    stacklevel=4,
                )
                return

    # -- groups
    def observed_data(self):
        groups = {}
        for name in self.observed:
            value = _numpy(self.sites[name]["value"])
            full = tuple(self.sites[name]["fn"].shape())
            groups[name] = np.broadcast_to(value, full).reshape(self.shapes[name]).copy()
        return groups

    def collect(self, particles, posterior_predictive, log_likelihood):
        S = particles.num_particles
        traces = particles.model_traces
        groups = {}
        groups["posterior"] = {
            n: self._per_draw(n, [t.nodes[n]["value"] for t in traces], S, self.shapes[n])
            for n in (*self.latent, *self.deterministic)
        }
        if posterior_predictive:
            groups["posterior_predictive"] = {
                n: self._per_draw(n, [t.nodes[n]["fn"].sample() for t in traces], S, self.shapes[n])
                for n in self.observed
            }
        if log_likelihood:
            groups["log_likelihood"] = {
                n: self._per_draw(
                    n,
                    [particles.model_sites[n].log_prob_unscaled],
                    S,
                    self.shapes[n][: self.num_batch[n]],
                )
                for n in self.observed
            }
        lp, log_q = _numpy(particles.log_p()), _numpy(particles.log_q())
        groups["sample_stats"] = {"lp": lp, "log_q": log_q, "log_weight": lp - log_q}
        return {g: {n: a[None] for n, a in vs.items()} for g, vs in groups.items()}  # chain dim

    @staticmethod
    def _per_draw(name, tensors, num_samples, shape) -> np.ndarray:
        """``(S, *shape)`` from one tensor with the particle dim leading (vectorized run, or the
        engine's aligned terms) or from S per-draw tensors (sequential run)."""
        if len(tensors) > 1 or num_samples == 1:
            values = [_numpy(t) for t in tensors]
            for value in values:
                if value.size != math.prod(shape):
                    raise ValueError(
                        f"site {name!r}: a draw of shape {value.shape} does not have the shape "
                        f"{shape} of the first draw"
                    )
            return np.stack([value.reshape(shape) for value in values])
        value = _numpy(tensors[0])
        size = math.prod(shape)
        stripped = _strip_leading_ones(value.shape)
        if stripped[:1] == (num_samples,) and value.size == num_samples * size:
            return value.reshape((num_samples, *shape))
        if value.size == size:  # does not depend on the draw (a constant deterministic site)
            return np.broadcast_to(value.reshape(shape), (num_samples, *shape)).copy()
        raise ValueError(
            f"site {name!r}: its vectorized value has shape {value.shape}, which does not hold "
            f"{num_samples} draws of shape {shape} with the draws on the leading dim"
        )
