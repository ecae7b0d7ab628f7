"""search: find smaller, faster transformer LMs by searching which decoder layers to remove.

from search import RunConfig, run, front_report
study = run(RunConfig(budget=0.12, trials=24))
print(front_report(study)["front"])
"""

from importlib import import_module

# Public names, imported lazily: `import search.errors` must not pull in torch and the engine.
_EXPORTS = {
    "Budget": "search.space",
    "parse_budget": "search.space",
    "RunConfig": "search.study",
    "run": "search.study",
    "SearchError": "search.errors",
    "front_report": "search.front",
    "export_trial": "search.export",
    "heal_trial": "search.lora",
    "evaluate_study": "search.accuracy",
    "LoraSettings": "evaluators.lora",
    "layers_removed": "search.model.surgery",
    "remove_layers": "search.model.surgery",
    "restore_layers": "search.model.surgery",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'search' has no attribute {name!r}")
    return getattr(import_module(_EXPORTS[name]), name)
