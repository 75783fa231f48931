"""The shared base of every pyro_elbo objective.

:class:`ParticleObjective` is a :class:`pyro.infer.ELBO` subclass.  A concrete objective only says
which terms it needs from the particle engine (:meth:`_engine_options`) and how to turn them into

* a loss value (what ``loss`` reports), and
* a surrogate whose gradient is the objective's gradient estimator (:meth:`_loss_and_surrogate`).

From those two the base class provides ``loss``, ``loss_and_grads`` (what ``pyro.infer.SVI``
calls), ``differentiable_loss`` (what ``ELBOModule`` and torch optimizers use) and ``__call__``;
the first of these calls on a (model, guide) pair runs ``fit``'s checks
(:mod:`pyro_elbo.fit.first_call`).
"""

from __future__ import annotations

import abc
import numbers
import warnings

import pyro.infer
import torch
from pyro.util import warn_if_nan

from pyro_elbo.engine.particles import Particles, guess_plate_nesting, run_particles

__all__ = ["ParticleObjective"]


class ParticleObjective(pyro.infer.ELBO):
    """Base class: K particles from the engine, a loss and a gradient surrogate.

    :param int num_particles: particles K per step (>= 1).
    :param bool vectorize_particles: draw the K particles in one pass, in an outer ``pyro.plate``
        (default), or one after another.
    :param max_plate_nesting: the model's plate nesting, without the particle plate.  Guessed from
        one run when left at ``inf``.
    :param retain_graph: passed to ``backward`` in ``loss_and_grads`` (Pyro's ``ELBO`` option).
    """

    #: the smallest number of particles the objective accepts
    min_particles = 1

    def __init__(
        self,
        num_particles: int = 1,
        *,
        vectorize_particles: bool = True,
        max_plate_nesting: float = float("inf"),
        retain_graph: bool | None = None,
    ):
        if (
            isinstance(num_particles, bool)
            or not isinstance(num_particles, numbers.Integral)
            or num_particles < self.min_particles
        ):
            raise ValueError(
                f"num_particles must be an integer >= {self.min_particles} for "
                f"{type(self).__name__}, got {num_particles!r}"
            )
        if max_plate_nesting != float("inf") and (
            not isinstance(max_plate_nesting, numbers.Integral) or max_plate_nesting < 0
        ):
            raise ValueError(
                f"max_plate_nesting must be a non-negative integer, got {max_plate_nesting!r}"
            )
        super().__init__(
            num_particles=int(num_particles),
            max_plate_nesting=max_plate_nesting,
            vectorize_particles=bool(vectorize_particles),
            retain_graph=retain_graph,
        )
        # Pyro adds one for its own particle plate; the engine places ours itself.
        self.max_plate_nesting = max_plate_nesting
        self._validated_pairs: set[tuple[int, int, bool]] = set()
        # pairs found not vectorization-safe (particles drawn one after another) or safe
        self._sequential_pairs: set[tuple[int, int]] = set()
        self._vectorized_pairs: set[tuple[int, int]] = set()

    # ----------------------------------------------------------------- hooks for subclasses
    def _engine_options(self, need_surrogate: bool) -> dict:
        """Extra keyword arguments for :func:`run_particles` (``detach_params``, ``beta``...)."""
        return {}

    @abc.abstractmethod
    def _loss_and_surrogate(self, particles: Particles, need_surrogate: bool):
        """Return ``(loss, surrogate)``: the loss value and a tensor whose gradient is the
        estimator (``surrogate`` may be ``None`` when ``need_surrogate`` is False)."""

    # ----------------------------------------------------------------- engine access
    def run_particles(self, model, guide, args, kwargs, **options) -> Particles:
        """Run the particle engine for this objective's settings (validating a new pair once)."""
        if self.max_plate_nesting == float("inf"):
            self.max_plate_nesting = guess_plate_nesting(model, guide, args, kwargs)
        # validate each pair once per kind of run (the detached replay adds its own check)
        pair = (id(model), id(guide), bool(options.get("detach_params")))
        sequential = (id(model), id(guide)) in self._sequential_pairs
        particles = run_particles(
            model,
            guide,
            args,
            kwargs,
            num_particles=self.num_particles,
            plate_nesting=int(self.max_plate_nesting),
            vectorize=self.vectorize_particles and not sequential,
            validate=pair not in self._validated_pairs,
            **options,
        )
        self._validated_pairs.add(pair)
        return particles

    def _get_trace(self, model, guide, args, kwargs):
        """One (model_trace, guide_trace) pair, as :class:`pyro.infer.ELBO` requires."""
        particles = self.run_particles(model, guide, args, kwargs)
        return particles.model_traces[0], particles.guide_traces[0]

    def _compute(self, model, guide, args, kwargs, need_surrogate: bool):
        self._call = (model, guide, args, kwargs)  # for objectives that must run the pair again
        options = self._engine_options(need_surrogate)
        pair = (id(model), id(guide))
        if pair in self._sequential_pairs or pair in self._vectorized_pairs:
            particles = self.run_particles(model, guide, args, kwargs, **options)
            return self._loss_and_surrogate(particles, need_surrogate)
        # the first run of a pair: is it vectorization-safe?
        try:
            particles = self.run_particles(model, guide, args, kwargs, **options)
            result = self._loss_and_surrogate(particles, need_surrogate)
        except Exception as error:
            if not (self.vectorize_particles and self.num_particles > 1):
                raise
            self._sequential_pairs.add(pair)
            try:
                particles = self.run_particles(model, guide, args, kwargs, **options)
                result = self._loss_and_surrogate(particles, need_surrogate)
            except Exception:
                self._sequential_pairs.discard(pair)
                raise  # fails unvectorized too: the error is the program's, not vectorization's
            warnings.warn(
                f"{type(self).__name__}: the model and guide are not vectorization-safe: drawn "
                f"in an outer pyro.plate of {self.num_particles} particles they failed with "
                f"{type(error).__name__}: {_first_line(error)}. Drawing the particles one after "
                "another instead (as Trace_ELBO does), which is slower. To vectorize, declare "
                "every batch dim with pyro.plate, index from the right (x[..., i], "
                "expand/reshape/squeeze with negative dims, matmul on the last dims), and avoid "
                "Python control flow on sampled values; pass vectorize_particles=False to "
                "silence this.",
                RuntimeWarning,
                stacklevel=3,
            )
            return result
        if self.vectorize_particles and self.num_particles > 1:
            self._vectorized_pairs.add(pair)
        return result

    # ----------------------------------------------------------------- pyro.infer.ELBO API
    def loss(self, model, guide, *args, **kwargs) -> float:
        """The objective's loss, as a float (no gradients)."""
        with torch.no_grad():
            loss, _ = self._checked_compute(model, guide, args, kwargs, need_surrogate=False)
        loss = float(loss)
        warn_if_nan(loss, "loss")
        return loss

    def differentiable_loss(self, model, guide, *args, **kwargs) -> torch.Tensor:
        """The loss as a tensor whose gradient is this objective's gradient estimator."""
        loss, surrogate = self._checked_compute(model, guide, args, kwargs, need_surrogate=True)
        if surrogate is None or not surrogate.requires_grad:
            return loss.detach()
        return loss.detach() + (surrogate - surrogate.detach())

    def loss_and_grads(self, model, guide, *args, **kwargs) -> float:
        """Accumulate the gradient estimate into ``.grad`` of the parameters; return the loss."""
        loss, surrogate = self._checked_compute(model, guide, args, kwargs, need_surrogate=True)
        if surrogate is not None and surrogate.requires_grad:
            surrogate.backward(retain_graph=self.retain_graph)
        loss = float(loss.detach())
        warn_if_nan(loss, "loss")
        return loss

    def _checked_compute(self, model, guide, args, kwargs, need_surrogate: bool):
        """:meth:`_compute`; the first call on a (model, guide) pair also runs the checks
        ``fit`` runs before step 1 (:mod:`pyro_elbo.fit.first_call`), later calls pay one set
        lookup."""
        if (id(model), id(guide)) in self.__dict__.get("_pyro_elbo_checked_pairs", ()):
            return self._compute(model, guide, args, kwargs, need_surrogate)
        from pyro_elbo.fit.first_call import run_first_call

        return run_first_call(
            self, model, guide, args, kwargs,
            lambda: self._compute(model, guide, args, kwargs, need_surrogate),
        )

    def __repr__(self) -> str:
        return f"{type(self).__name__}(num_particles={self.num_particles})"


def _first_line(error: Exception) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else "(no message)"
