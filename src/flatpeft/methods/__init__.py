"""The registered methods: one module each, one ``register_method`` call each.

Importing this package registers them in this order, which is also :data:`flatpeft.METHODS`.
"""
from flatpeft.methods import (  # noqa: F401  (imported for registration)
    base,
    sam,
    asam,
    flat_lora,
    eflat_lora,
    flat_lora_random,
    flatpo,
    flatpo_lagged,
    spider,
    bar,
)
from flatpeft.optim.registry import mark_builtin

mark_builtin()  # the methods registered so far are flatpeft's own: they cannot be unregistered
