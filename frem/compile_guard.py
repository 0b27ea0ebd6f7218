"""FREM under ``torch.compile``: Dynamo must notice when hooks come and go.

By default Dynamo does not guard on module hooks
(``torch._dynamo.config.skip_nnmodule_hook_guards = True``): a model
compiled before ``frem.attach`` keeps running its graph without FREM, a model
compiled with FREM keeps it after ``detach``, and a twin instance of the same
class may reuse either graph. A regularizer that silently does nothing (or
acts where it was removed) is the worst outcome, so frem turns the hook
guards on, for the whole process, the first time a FREM is attached:

* if Dynamo is already imported, at once, and its caches are reset once so
  that what was compiled without hook guards recompiles with them;
* otherwise when Dynamo is first imported, so nothing is ever compiled
  without them (no import of Dynamo here: it costs seconds).

Cost: Dynamo then checks each compiled module's hook dictionaries on every
call (a guard), and models compiled before the first attach recompile once.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys

CONFIG = "torch._dynamo.config"
_state = {"on": False}


def ensure_hook_guards() -> None:
    """Make Dynamo guard on module hooks from now on (see the module docstring)."""
    if _state["on"]:
        return
    _state["on"] = True
    if CONFIG in sys.modules or "torch._dynamo" in sys.modules:
        import torch._dynamo
        torch._dynamo.config.skip_nnmodule_hook_guards = False
        torch._dynamo.reset()  # what was compiled without hook guards recompiles with them
    elif not any(isinstance(finder, _SetWhenImported) for finder in sys.meta_path):
        sys.meta_path.insert(0, _SetWhenImported())


class _SetWhenImported(importlib.abc.MetaPathFinder):
    """Sets ``skip_nnmodule_hook_guards = False`` right after Dynamo's config module loads."""

    def find_spec(self, name, path, target=None):
        if name != CONFIG:
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path, target)
        if spec is None or spec.loader is None:
            return spec
        load = spec.loader.exec_module

        def exec_module(module):
            load(module)
            module.skip_nnmodule_hook_guards = False

        spec.loader.exec_module = exec_module
        return spec
