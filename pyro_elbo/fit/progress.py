"""``fit``'s progress bar (tqdm, on a terminal or in a notebook) and its text."""

from __future__ import annotations

import math
import sys

__all__ = []


def _show_progress(progress) -> bool:
    if progress is True or progress is False:
        return progress
    if progress == "auto":
        if "ipykernel" in sys.modules:
            return True
        stream = sys.stderr
        return bool(getattr(stream, "isatty", None) and stream.isatty())
    raise ValueError(f"fit: progress must be True, False or 'auto', got {progress!r}")


def _progress_bar(show, total, initial, desc="fit", unit="step"):
    if not show:
        return None
    if "ipykernel" in sys.modules:
        from tqdm.auto import tqdm
    else:
        from tqdm import tqdm
    return tqdm(total=total, initial=initial, desc=desc, unit=unit, dynamic_ncols=True)


def _callable_name(fn):
    return getattr(fn, "__qualname__", None) or getattr(fn, "__name__", None) or repr(fn)


def _postfix(losses, rule):
    recent = [v for v in losses[-100:] if math.isfinite(v)]
    text = f"loss {sum(recent) / len(recent):.5g}" if recent else "loss -"
    status = rule.status if rule is not None else ""
    return f"{text} | {status}" if status else text



def callback_stop(callbacks, state, step, value, strategy=None):
    """Why the callbacks stop the run after ``step`` (one of them returned True; in a
    data-parallel run, one on any rank), or None."""
    state.step, state.loss = step, value
    stopping = [cb for cb in callbacks if cb(state) is True]
    if strategy is not None and strategy.agree(bool(stopping)):
        stopping = stopping or ["a callback on another rank"]
    return f"stopped by the callback {_callable_name(stopping[0])}" if stopping else None


def advance_bar(bar, step, losses, rule):
    """Move the progress bar to ``step`` every 50 steps (tqdm refreshes at its own rate)."""
    if bar is not None and step % 50 == 0:
        bar.update(step - bar.n)
        bar.set_postfix_str(_postfix(losses, rule), refresh=False)
