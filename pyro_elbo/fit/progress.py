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

