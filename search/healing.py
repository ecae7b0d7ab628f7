"""How a pruned model is healed before it is measured: `--heal none|linear` (the HEALINGS registry).

`linear` is evaluators/healing.py: one least-squares map per removed run, folded into the
preceding layer's MLP output projection. A new training-free healing is one function with the
same signature as `fit_healing`, registered here.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from torch import nn

from evaluators.healing import FitStats, Healing, fit_healing, fold_reason
from search.errors import SearchError
from search.registry import Registry

Fit = Callable[[nn.Module, FitStats, Sequence[int], float, bool], Healing]

HEALINGS: Registry[Fit | None] = Registry("healing")
HEALINGS.add("none", None, "measure the pruned model as it is")
HEALINGS.add(
    "linear",
    fit_healing,
    "fit one linear map per removed run on --heal-tokens fitting tokens (never held-out ones) and fold it "
    "into the preceding layer's MLP output projection (ReplaceMe); the model keeps its architecture",
)


def check_healable(model: nn.Module, heal: str) -> None:
    """One line, before any work, when this family cannot be healed this way."""
    if HEALINGS[heal] is not None and (reason := fold_reason(model)):
        raise SearchError(f"--heal {heal} is not available for this model: {reason}")
