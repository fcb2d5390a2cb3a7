"""flatpeft: flatness-aware parameter-efficient fine-tuning.

    import flatpeft, torch
    opt = flatpeft.create_optimizer(model, "flatpo", base_optimizer=torch.optim.AdamW, lr=1e-4, rho=0.05, fraction=0.05)
    opt.zero_grad()
    loss = opt.step(closure)   # closure() runs forward and backward and returns the loss
    flatpeft.METHODS           # the registered method names

The docs and the built-in configs ship inside the package: a reference such as ``docs/algorithms.md`` or
``configs/suite.yaml`` in these docstrings names ``flatpeft/docs/algorithms.md`` / ``flatpeft/configs/suite.yaml``
(``flatpeft docs algorithms``, ``flatpeft configs suite``), the same files as in a checkout (:mod:`flatpeft.resources`).
"""
from flatpeft import methods as _methods  # noqa: F401  (registers the built-in methods)
from flatpeft.optim import MethodInfo, RNGState, SharpnessAware, create_optimizer, get_method, method_names, register_method

__version__ = "0.1.0"

METHODS: tuple[str, ...] = method_names()
"""Names of the built-in methods, in registration order."""

__all__ = ["METHODS", "MethodInfo", "RNGState", "SharpnessAware", "__version__", "create_optimizer", "get_method", "register_method"]
