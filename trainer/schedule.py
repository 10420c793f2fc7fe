"""Learning-rate schedule: linear warmup, then cosine decay to a floor (per phase)."""

from __future__ import annotations

import math
from typing import Callable


def warmup_cosine(warmup_steps: int, total_steps: int, min_ratio: float) -> Callable[[int], float]:
    """Multiplier of the peak lr at optimizer step ``step`` (0-based), for ``LambdaLR``.

    Warmup reaches the peak at step ``warmup_steps - 1``: the first step already learns
    (a zero lr would waste it). The cosine then falls to ``min_ratio`` at the last step.
    """

    def multiplier(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        decay_steps = max(1, total_steps - 1 - warmup_steps)
        progress = min(1.0, (step - warmup_steps) / decay_steps)
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return multiplier
