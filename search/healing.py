"""How a pruned model is healed before it is measured: `--heal none|linear` (the HEALINGS registry).

`linear` is evaluators/healing.py: one least-squares map per removed run of blocks, folded into
the output projection of the block before it (a layer's MLP, or in a sub-layer space an attention
block). A new training-free healing is one function with the
same signature as `fit_healing`, registered here.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from evaluators.healing import FitStats, Healing, fit_healing, fold_reason
from search.errors import SearchError
from search.model.removal import Removal
from search.registry import Registry

Fit = Callable[[nn.Module, FitStats, Removal, float, bool], Healing]

HEALINGS: Registry[Fit | None] = Registry("healing")
HEALINGS.add("none", None, "measure the pruned model as it is")
HEALINGS.add(
    "linear",
    fit_healing,
    "fit one linear map per removed run on --heal-tokens fitting tokens (never held-out ones) and fold it "
    "into the output projection of the block before the run (ReplaceMe); the model keeps its architecture",
)


def check_healable(model: nn.Module, heal: str, blocks: bool = False) -> None:
    """One line, before any work, when this family cannot be healed this way (`blocks`: runs of lone
    blocks too, which may follow an attention block)."""
    if HEALINGS[heal] is not None and (reason := fold_reason(model, blocks)):
        raise SearchError(f"--heal {heal} is not available for this model: {reason}")
