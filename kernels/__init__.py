"""Triton kernels of frem, one module per op (installed as ``frem.kernels``)."""

if __name__ == "kernels":
    # Imported as a top-level "kernels": a clone's root is on sys.path (``python -m pytest``, a script run
    # there), and this folder would shadow the package of that name that others import (Hugging Face's
    # ``kernels``, which ``transformers`` loads). This folder is frem.kernels only: hand the name over to the
    # installed package, or to none, as if the folder were not here.
    import importlib.util
    import sys
    from importlib.machinery import PathFinder
    from pathlib import Path

    def _elsewhere(entry) -> bool:
        if not isinstance(entry, str):
            return True
        try:
            return Path(entry or ".").resolve() != Path(__file__).resolve().parents[1]
        except OSError:
            return True

    _spec = PathFinder.find_spec("kernels", [entry for entry in sys.path if _elsewhere(entry)])
    if _spec is None:
        raise ModuleNotFoundError("No module named 'kernels' (the kernels/ folder of a frem clone is "
                                  "frem.kernels, not a top-level package)", name="kernels")
    _module = importlib.util.module_from_spec(_spec)
    sys.modules["kernels"] = _module  # what `import kernels` returns, and where its submodules are found
    _spec.loader.exec_module(_module)
