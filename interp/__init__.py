"""Model-agnostic interpretability machinery: hook points, caches, circuit maths, views.

Nothing here imports the model classes (DESIGN.md: analyses -> models -> interp).
"""

from interp.cache import ActivationCache
from interp.hooks import HookedRootModule, HookHandle, HookPoint
from interp.names import HookNameError, act_name

__all__ = ["ActivationCache", "HookedRootModule", "HookHandle", "HookPoint", "HookNameError", "act_name"]
