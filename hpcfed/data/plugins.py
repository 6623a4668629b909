"""User factories named by an import path ``package.module:function`` (models and data sets).

The module is imported with importlib from ``sys.path`` (so from PYTHONPATH or the current
folder); every failure is one :class:`HpcfedError` line that names the config key and the path.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable
from typing import Any

from hpcfed.errors import HpcfedError


def one_line(err: BaseException, limit: int = 300) -> str:
    """``Type: message`` on one line, shortened to ``limit`` characters."""
    text = " ".join(f"{type(err).__name__}: {err}".split())
    return text if len(text) <= limit else text[:limit - 3] + "..."


def resolve(key: str, path: str) -> Callable[..., Any]:
    """The callable at ``path`` ('package.module:attr[.attr]'), ``key`` naming the config key."""
    module_name, _, attrs = path.partition(":")
    where = f"{key} '{path}'"
    try:
        target: Any = importlib.import_module(module_name)
    except Exception as err:  # ImportError, or whatever the module raised while importing
        raise HpcfedError(f"{where}: cannot import module '{module_name}' ({one_line(err)}); "
                          "is its folder on PYTHONPATH?") from None
    for attr in attrs.split("."):
        if not hasattr(target, attr):
            raise HpcfedError(f"{where}: module '{module_name}' has no attribute '{attrs}'")
        target = getattr(target, attr)
    if not callable(target):
        raise HpcfedError(f"{where}: '{attrs}' is a {type(target).__name__}, not a callable factory")
    return target


def call(key: str, path: str, factory: Callable[..., Any], kwargs: dict[str, Any], offered: dict[str, Any]) -> Any:
    """``factory(**kwargs, **offered)``, passing each ``offered`` argument only where its signature names it
    (and ``kwargs`` does not); whatever the factory raises becomes one line."""
    try:
        parameters = inspect.signature(factory).parameters
    except (TypeError, ValueError):  # some builtins have no signature
        parameters = {}
    extra = {name: value for name, value in offered.items() if name in parameters and name not in kwargs}
    try:
        return factory(**kwargs, **extra)
    except Exception as err:
        raise HpcfedError(f"{key} '{path}': the factory raised {one_line(err)}") from None
