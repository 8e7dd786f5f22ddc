"""mimae_scale: distributed pretraining of MI-MAE."""

from __future__ import annotations

import importlib.machinery
import sys
from pathlib import Path

__version__ = "0.1.0"

# `kernels/` and `data_tools/` sit at the top of the repository and are installed as
# `mimae_scale.kernels` / `mimae_scale.data_tools` (pyproject's package-dir). A run straight from a
# checkout (`PYTHONPATH=.`, or a wheel installed beside a checkout that comes first on sys.path)
# would not find them, and `mimae_scale.kernels` must never be missing silently. So when this
# package is the checkout's (pyproject.toml beside it), those two names resolve to the folders.
_CHECKOUT = Path(__file__).resolve().parent.parent
_BESIDE = ("kernels", "data_tools")


class _CheckoutFinder:
    @staticmethod
    def find_spec(fullname: str, path=None, target=None):
        parent, _, leaf = fullname.rpartition(".")
        if parent != __name__ or leaf not in _BESIDE:
            return None
        return importlib.machinery.PathFinder.find_spec(fullname, [str(_CHECKOUT)])


if (_CHECKOUT / "pyproject.toml").is_file() and all((_CHECKOUT / d / "__init__.py").is_file() for d in _BESIDE):
    sys.meta_path.append(_CheckoutFinder())
