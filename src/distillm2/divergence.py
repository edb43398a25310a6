"""Divergence: a stage whose loss explodes or whose gradient vanishes stops with the step and the
numbers instead of saving the weights it ruined.

Non-finite steps are skipped and counted by the Trainer (``train.max_nonfinite_steps``); a
learning rate far too high often stays finite. At ``train.lr=1e6`` the first AdamW update moves
every weight by about 1e6, the next step's loss is orders of magnitude above the first and the
softmax saturates, so the gradient norm is exactly 0.0 from then on and the stage would finish,
save and report success. Two signals catch that and do not fire in a healthy run:

- **exploding loss**: a step's loss above ``factor`` times the stage's reference, the median of
  its first :data:`REFERENCE_STEPS` logged losses, floored at :data:`FLOOR` (1 nat per token). The losses here are per-token KL divergences
  and NLLs; within one stage they fall, and the growing reverse-KL weight beta (at most
  ``beta_max / beta0``, 1.5x at the paper's defaults) moves them by far less than 10x.
  DistiLLM-2's skew KLs are bounded by -log alpha (2.3 nats at alpha 0.1), so for that loss it
  is the next signal that fires.
- **vanished gradient**: an exactly-zero gradient norm on a step that trained tokens, two steps in
  a row. A trainable model with a finite, non-constant loss never has one; saturated weights do.

The reference is kept in the Trainer's state, so a resumed stage compares with the same numbers.
"""

from __future__ import annotations

import math
import statistics

REFERENCE_STEPS = 3  # the reference is the median of this many first steps (one odd batch does not set it)
FLOOR = 1.0  # nats per token: the smallest reference a loss is compared with
ZERO_GRAD_STEPS = 2  # zero gradient norms in a row before the stage stops


def check(state: dict, step: int, loss: float, grad_norm: float, factor: float) -> str | None:
    """Record step ``step``'s ``loss`` and ``grad_norm`` in ``state`` (the Trainer's resumable
    state: keys ``loss_reference``, ``zero_grad_in_a_row``) and return why the stage diverged,
    or None. ``factor`` <= 0 turns the check off. Non-finite values are not judged here (the
    Trainer skips those steps)."""
    if factor <= 0 or not (math.isfinite(loss) and math.isfinite(grad_norm)):
        return None
    ref = state.setdefault("loss_reference", [])
    if isinstance(ref, list):  # still collecting the first steps' losses
        ref.append(loss)
        if len(ref) == REFERENCE_STEPS:
            state["loss_reference"] = statistics.median(ref)
    state["zero_grad_in_a_row"] = state.get("zero_grad_in_a_row", 0) + 1 if grad_norm == 0.0 else 0
    if state["zero_grad_in_a_row"] >= ZERO_GRAD_STEPS:
        return (f"the gradient norm has been exactly 0 for {state['zero_grad_in_a_row']} steps (loss {loss:.4g}): "
                "the weights are saturated")
    reference = ref[0] if isinstance(ref, list) else ref  # until the median exists: the first step's loss
    # floored at FLOOR nats per token: near a loss of 0 (a student already close to its teacher, tiny
    # models) a 20x rise from 5e-4 is noise, not divergence
    if loss > factor * max(reference, FLOOR):
        return (f"loss {loss:.4g} is {loss / reference:.3g}x the stage's reference {reference:.4g} "
                f"(train.divergence_factor={factor:g}, reference floored at {FLOOR:g}); gradient norm {grad_norm:.4g}")
    return None
