"""Model-agnostic interpretability machinery: hook points, caches, circuit maths, views.

Nothing here imports the model classes (DESIGN.md: analyses -> models -> interp).
"""

from interp.attach import Attached, attach
from interp.cache import ActivationCache
from interp.factored_matrix import FactoredMatrix
from interp.hooks import HookedRootModule, HookHandle, HookPoint
from interp.names import HookNameError, act_name

__all__ = ["Attached", "attach", "ActivationCache", "FactoredMatrix", "HookedRootModule", "HookHandle", "HookPoint",
           "HookNameError", "act_name"]
