"""Which optimiser steps at which iteration of DMD2 (the two time-scale update rule, DMD2 §4.2).

A pure function of the 0-based iteration counter, so a resumed run needs no schedule state: the iteration
number in the checkpoint decides. As the reference (main/edm/train_edm.py): at iteration i the generator steps
first when i % dfake_gen_update_ratio == 0 (so iteration 0 updates it), then the fake score network (and its
GAN head) steps, at every iteration, on the samples that iteration's generator forward produced (detached).
Both learning-rate schedules advance every iteration (the reference calls both schedulers each iteration), so
warm-up counts iterations, not generator updates.
"""

from __future__ import annotations

from typing import NamedTuple

__all__ = ["UpdatePlan", "check_ratio", "generator_turn", "update_plan", "generator_updates_before"]


class UpdatePlan(NamedTuple):
    iteration: int  # 0-based
    generator: bool  # the generator's optimiser steps (first)
    fake: bool  # the fake score network's optimiser steps (second; always True)


def check_ratio(dfake_gen_update_ratio: int) -> int:
    """The ratio as an int >= 1, or a clear error (a float 5.0 from YAML is accepted)."""
    r = dfake_gen_update_ratio
    if isinstance(r, bool) or not (isinstance(r, int) or (isinstance(r, float) and r.is_integer())) or r < 1:
        raise ValueError(f"dfake_gen_update_ratio must be an int >= 1 (fake-score steps per generator step), "
                         f"got {dfake_gen_update_ratio!r}")
    return int(r)


def _check_iteration(iteration: int) -> int:
    if isinstance(iteration, bool) or not isinstance(iteration, int) or iteration < 0:
        raise ValueError(f"iteration must be an int >= 0 (0-based), got {iteration!r}")
    return iteration


def generator_turn(iteration: int, dfake_gen_update_ratio: int) -> bool:
    """True when the generator steps at this 0-based iteration: iteration % ratio == 0."""
    return _check_iteration(iteration) % check_ratio(dfake_gen_update_ratio) == 0


def update_plan(iteration: int, dfake_gen_update_ratio: int) -> UpdatePlan:
    """What steps at this iteration: the generator every ratio-th iteration, the fake score network always."""
    return UpdatePlan(iteration, generator_turn(iteration, dfake_gen_update_ratio), True)


def generator_updates_before(iteration: int, dfake_gen_update_ratio: int) -> int:
    """How many generator steps iterations 0 … iteration−1 made: ⌈iteration / ratio⌉ (for logs and resume
    checks)."""
    r = check_ratio(dfake_gen_update_ratio)
    return -(-_check_iteration(iteration) // r)
