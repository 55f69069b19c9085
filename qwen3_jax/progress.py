"""One progress bar for every long step (loading weights, quantizing, compiling)."""

from __future__ import annotations


class _NoBar:
    def update(self, n=1):
        pass

    def close(self):
        pass


def progress_bar(total: int, desc: str, unit: str, enabled: bool = True, leave: bool = False):
    """A tqdm bar, or a no-op with the same two methods when disabled or tqdm is missing."""
    if not enabled:
        return _NoBar()
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return _NoBar()
    return tqdm(total=total, desc=desc, unit=unit, leave=leave)
