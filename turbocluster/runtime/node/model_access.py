"""Which models a node will open: ``--models-dir`` confines LoadLayers to what the operator allows.

A LoadLayers names a model; without a check a caller could make the node parse
any local file or fetch any hub id, and learn from the error whether a path
exists. With a models directory, a model is a path under it (after resolving
symlinks), and anything else — missing, outside, a hub id — gets the same
INVALID_ARGUMENT, so the answer reveals nothing about the file system.
"""

import logging
import os
from pathlib import Path
from typing import Optional

import grpc

from .gate import Refused

log = logging.getLogger(__name__)


def _refused(name: str, models_dir) -> Refused:
    where = "under this node's --models-dir" if models_dir else "this node can load"
    return Refused(grpc.StatusCode.INVALID_ARGUMENT, f"model {name!r} is not a model {where}")


def resolve(name: Optional[str], models_dir: Optional[str]) -> Optional[str]:
    """The path (or id) to load for ``name``; refuses anything outside ``models_dir`` when set."""
    name = name or None
    if models_dir is None:
        return name
    if name is None or "\0" in name:
        raise _refused(name or "", models_dir)
    root = Path(os.path.realpath(models_dir))
    candidate = Path(os.path.realpath(root / name))  # follows symlinks: a link out of the root is outside
    try:
        inside = os.path.commonpath([root, candidate]) == str(root) and candidate != root
    except ValueError:
        inside = False
    if not inside or not candidate.exists():
        log.warning("refused model %r (outside %s or missing)", name, root)
        raise _refused(name, models_dir)
    return str(candidate)


def describe(loader, name: Optional[str], models_dir: Optional[str]):
    """``(model_arg, loader.describe(model_arg))``; any failure is the one INVALID_ARGUMENT."""
    model_arg = resolve(name, models_dir)
    try:
        return model_arg, loader.describe(model_arg)
    except Exception as e:  # the loader's own errors name paths and hub state: keep them in the node's log
        log.warning("could not describe model %r: %s", name, e)
        raise _refused(name or "", models_dir) from None
