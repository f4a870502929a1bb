"""Fitted estimators on disk, with skops: what a CPU member, a blender or a decision rule
learned, kept so a new test set is predicted without refitting.

Trust boundary: ``pickle`` (and joblib) run arbitrary code when a file is loaded, so a model
file someone hands you (a Kaggle dataset, a bundle) could take over the machine. skops stores
an object as a tree of plain nodes (JSON + ``.npy`` arrays) and loading rebuilds only types the
caller trusts. :func:`load` trusts skops' defaults (numpy, scipy, builtins, scikit-learn
estimators) plus exactly the types its caller lists, refuses a file that asks for anything
else, naming the types, and never unpickles. Objects that hold something skops cannot store
(a torch module) turn it into arrays in ``__getstate__`` and rebuild it in ``__setstate__``.
"""

from __future__ import annotations

import sys
import types
from collections.abc import Collection
from pathlib import Path
from typing import Any

from mmfold import fileio
from mmfold.errors import UserError

# LightGBM models (inside member heads and the lgbm stacker) are stored by skops through
# their own model text (the booster's ``__getstate__``): these are the types that rebuild them.
LIGHTGBM_TYPES = ("lightgbm.sklearn.LGBMClassifier", "lightgbm.basic.Booster",
                  "lightgbm.sklearn._LGBMLabelEncoder", "collections.OrderedDict")


# scikit-learn's vendored array-API shim for torch: importing it imports torch.
_TORCH_SHIM = "sklearn.externals.array_api_compat.torch"


def _skops_io() -> types.ModuleType:
    """``skops.io``, imported without importing torch.

    skops builds its trusted-type list with scikit-learn's ``all_estimators``, which imports
    every scikit-learn module, the torch array-API shim included, and that imports torch: a
    second or two and hundreds of modules in a blend that never touches a tensor. While skops
    is imported (only then, and only when torch is not loaded already) the shim is an empty
    module: it defines no estimator, so the trusted list is the same.
    """
    if "skops.io" in sys.modules or "torch" in sys.modules or _TORCH_SHIM in sys.modules:
        import skops.io

        return skops.io
    stub = sys.modules[_TORCH_SHIM] = types.ModuleType(_TORCH_SHIM)
    try:
        import skops.io
    finally:
        if sys.modules.get(_TORCH_SHIM) is stub:
            del sys.modules[_TORCH_SHIM]
    return skops.io


def save(obj: Any, path: Path) -> Path:
    """Write ``obj`` as a skops file, atomically (a kill mid-write keeps the old file)."""
    sio = _skops_io()

    return fileio.atomic_write(Path(path), lambda tmp: sio.dump(obj, tmp))


def untrusted_types(data: bytes, trusted: Collection[str]) -> list[str]:
    """The types a skops file's bytes need beyond skops' defaults and ``trusted``."""
    return sorted(set(_skops_io().get_untrusted_types(data=data)) - set(trusted))


def load(path: Path, trusted: Collection[str], what: str) -> Any:
    """Load a skops file whose every type is trusted.

    The bytes are read once, so the file that was checked is the file that is loaded.

    Args:
        path: The file.
        trusted: Fully qualified type names the caller trusts besides skops' defaults.
        what: What the file is, for messages.

    Raises:
        UserError: the file is missing, or asks for a type nobody trusted (named).
    """
    path = Path(path)
    if not path.exists():
        raise UserError(f"{what}: {path} not found")
    data = path.read_bytes()
    extra = untrusted_types(data, trusted)
    if extra:
        raise UserError(f"{what}: {path} asks to load types mmfold does not trust: {extra}; it was not "
                        "written by this version of mmfold, or was tampered with (nothing was loaded)")
    return _skops_io().loads(data, trusted=sorted(trusted))
