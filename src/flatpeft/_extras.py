"""Optional dependencies: which extra installs what, and a clear error when one is missing.

``pip install flatpeft`` installs the optimizer core (torch only). The other parts need an extra:

=============  ===============================================================  ==============================
extra          packages                                                         parts
=============  ===============================================================  ==============================
``hf``         transformers, peft, accelerate                                   ``flatpeft.integrations``
``analysis``   numpy, scipy, matplotlib, tqdm                                   ``flatpeft.analysis``
``cli``        ``hf`` + ``analysis`` + pandas, pyarrow, pyyaml, safetensors,    ``flatpeft.experiments``, the
               filelock                                                         ``flatpeft`` command
``tensorboard`` tensorboard                                                     ``tb/`` event files of
                                                                                ``flatpeft train`` (optional:
                                                                                ``metrics.jsonl`` has the same)
``data``       rdata, gguf                                                      ``flatpeft data prepare`` of
                                                                                finefoods, janeausten, smollm2
``multimodal`` ``cli`` + pillow                                                 ``flatpeft.multimodal``
``trl``        ``hf`` + trl                                                     trl trainers (SFTTrainer ...)
``all``        all of the above
=============  ===============================================================  ==============================

A module that needs an extra calls :func:`require` before its optional imports::

    from flatpeft._extras import require
    require("cli", "yaml", "pandas")
"""
from __future__ import annotations

import importlib.util

__all__ = ["EXTRAS", "require", "missing"]

#: import name -> distribution name, where they differ
_DIST = {"yaml": "pyyaml", "PIL": "pillow"}

#: extra -> import names of the packages it installs (the ones flatpeft imports)
EXTRAS: dict[str, tuple[str, ...]] = {
    "hf": ("transformers", "peft", "accelerate"),
    "analysis": ("numpy", "scipy", "matplotlib", "tqdm"),
    "cli": ("transformers", "peft", "accelerate", "numpy", "scipy", "matplotlib", "tqdm", "pandas", "pyarrow",
            "yaml", "safetensors", "filelock"),
    "tensorboard": ("tensorboard",),
    "data": ("rdata", "gguf"),
    "cluster": ("submitit",),
    "multimodal": ("transformers", "peft", "accelerate", "numpy", "scipy", "matplotlib", "tqdm", "pandas",
                   "yaml", "safetensors", "PIL"),
    "trl": ("transformers", "peft", "accelerate", "trl"),
}


def _installed(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):  # a blocked or half-imported module counts as missing
        return False


def missing(*modules: str) -> list[str]:
    """The import names among ``modules`` that cannot be imported."""
    return [m for m in modules if not _installed(m)]


def require(extra: str, *modules: str, part: str | None = None) -> None:
    """Raise ``ImportError`` naming ``extra`` when one of ``modules`` (import names) is not installed.

    ``modules`` defaults to every package of the extra. ``part`` names what needs them in the message
    (default: ``flatpeft[extra]``'s users).
    """
    if extra not in EXTRAS:
        raise ValueError(f"unknown extra {extra!r}; known: {', '.join(EXTRAS)}")
    absent = missing(*(modules or EXTRAS[extra]))
    if absent:
        names = ", ".join(_DIST.get(m, m) for m in absent)
        what = part or "this part of flatpeft"
        raise ImportError(
            f"{what} needs {names}, which {'is' if len(absent) == 1 else 'are'} not installed; "
            f"install the extra: pip install 'flatpeft[{extra}]'"
        )
