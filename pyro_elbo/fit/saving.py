"""``fit``'s checkpoints of a run: what is written every ``checkpoint_every`` steps and at the end
(parameters, optimizer, random states, losses, the rule's and the data's position, the run's
identity), and the resume that restores it bit for bit (:mod:`.checkpoint` writes and reads the
file; :mod:`.identity` compares the runs)."""

from __future__ import annotations

import warnings

import torch

import pyro_elbo.fit.identity as identity
from pyro_elbo.fit import checkpoint as ckpt
from pyro_elbo.fit import data_parallel

__all__ = ["resume", "save"]


def resume(run):
    """Restore the checkpoint; return a result if it holds a finished run, else ``None``."""
    path, rule = run.checkpoint, run.rule
    strategy = run.strategy
    if strategy is None:
        state = data_parallel.rank_state(ckpt.load(path, required=ckpt.REQUIRED_KEYS), 0, 1, path)
    else:  # rank 0 reads, every rank receives
        state = strategy.on_main(lambda: ckpt.load(path, required=ckpt.REQUIRED_KEYS),
                                 "reading the checkpoint")
        state = data_parallel.rank_state(state, strategy.rank, strategy.world_size, path)
    ckpt.check_fingerprint(
        state["fingerprint"], ckpt.fingerprint(run.names, run.leaves), path
    )
    if state["optim"]["kind"] != run.opt.kind:
        raise ckpt.CheckpointMismatchError(
            f"the checkpoint {path!r} holds the state of a {state['optim']['kind']} optimizer "
            f"but this run uses a {run.opt.kind} one ({type(run.opt.optimizer).__name__}); "
            "pass the same kind of optim, or resume=False to start over."
        )
    notices = identity.check_resume(run, state, path)
    with torch.no_grad():
        for name, leaf in zip(run.names, run.leaves):
            leaf.copy_(state["params"][name])
    identity.load_optimizer(run, state, path)
    run.step = int(state["step"])
    run.losses = [float(v) for v in state["losses"].tolist()]
    run.skipped = [int(s) for s in state["skipped"]]
    saved_rule = state.get("rule")
    if rule is not None:
        if saved_rule is not None and saved_rule["type"] == type(rule).__name__:
            rule.load_state_dict(saved_rule["state"])
        else:
            warnings.warn(
                f"fit: the checkpoint's convergence state ({saved_rule and saved_rule['type']})"
                f" does not match this run's rule ({type(rule).__name__}); the rule starts "
                "afresh at the resumed step.",
                stacklevel=4,
            )
    if run.batches is not None and state.get("data") is not None:
        identity.load_batches(run.batches, state["data"], path)
    if notices:
        warnings.warn(f"fit: resuming {path!r} at step {run.step}: {'; '.join(notices)}",
                      ckpt.ResumeNotice, stacklevel=4)
    ckpt.set_rng_state(state["rng"])  # last: the data loader's replay above draws too
    run.resumed_from = run.step
    if state["done"] and (state["converged"] or run.step >= run.target):
        if rule is not None:
            rule.finish()
        return run._result(
            bool(state["converged"]),
            f"restored from the finished checkpoint {path!r}: {state['reason']}",
            0.0,
        )
    return None

def save(run, done=False, converged=False, reason=""):
    """Write the checkpoint; a failed write keeps the previous one, warns, and is kept in
    ``checkpoint_error`` for the result (the run and its parameters go on in memory)."""
    rule = run.rule
    if run.torn:
        return
    rng, data = ckpt.get_rng_state(), run.batches.state_dict() if run.batches is not None else None
    strategy = run.strategy
    if strategy is not None:  # every rank's random and data states; rank 0 writes
        rng, data = strategy.gather(rng), strategy.gather(data)
        if not strategy.writes:
            return
    state = {
        "format": ckpt.FORMAT,
        "fingerprint": ckpt.fingerprint(run.names, run.leaves),
        "params": {name: leaf.detach() for name, leaf in zip(run.names, run.leaves)},
        "optim": {"kind": run.opt.kind, "state": run.opt.state_dict()},
        "rng": rng,
        "step": run.step,
        "losses": torch.tensor(run.losses, dtype=torch.float64),
        "skipped": list(run.skipped),
        "rule": None
        if rule is None
        else {"type": type(rule).__name__, "state": rule.state_dict()},
        "data": data,
        "objective": repr(run.objective),
        "run": run.identity,
        "target": run.target,
        "done": done,
        "converged": converged,
        "reason": reason,
        "world_size": 1 if strategy is None else strategy.world_size,
    }
    try:
        ckpt.save_atomic(state, run.checkpoint)
    except ckpt.CheckpointWriteError as error:
        if run.checkpoint_error is None:
            warnings.warn(f"fit: {error}", RuntimeWarning, stacklevel=4)
        run.checkpoint_error = error
