"""How to install one of frem's extras, said where it is missing.

frem is not on PyPI yet: run from a clone (an editable install), the line names
the clone's folder; installed from a wheel, the published name.
"""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def install_command(extra: str) -> str:
    """``pip install`` of frem's ``extra`` that works for this copy of frem."""
    if (ROOT / "pyproject.toml").is_file() and (ROOT / "frem" / "__init__.py").is_file():
        return f'pip install -e "{ROOT}[{extra}]"'
    return f'pip install "frem[{extra}]"'
