"""The flatpeft engine: the ``SharpnessAware`` wrapper, the method registry and RNG replay."""
from flatpeft.optim.registry import MethodInfo, create_optimizer, get_method, method_names, register_method
from flatpeft.optim.rng import RNGState
from flatpeft.optim.sharpness_aware import SharpnessAware

__all__ = ["MethodInfo", "RNGState", "SharpnessAware", "create_optimizer", "get_method", "method_names", "register_method"]
