"""The compiled fast path's machinery (the public names are in :mod:`pyro_elbo.fast`).

* :mod:`.capture`: the static-structure check, capturing one step as an FX graph with
  ``make_fx`` and compiling it with inductor;
* :mod:`.graphs`: :class:`~.graphs.CompiledLossAndGrads`, the compiled ``loss_and_grads``
  (one graph per argument signature; the optimizer runs eagerly after it);
* :mod:`.optim`: Adam and ClippedAdam written as graph ops, over the optimizer's own state;
* :mod:`.whitened`: fit's default ``WhitenedAdam`` (whitened Adam on a Gaussian autoguide) as
  graph ops;
* :mod:`.fused`: :class:`~.fused.FusedStep`, loss, gradients and the optimizer update as one
  compiled graph, with the NaN guard's flags kept on the device.
"""
