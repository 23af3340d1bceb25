"""The embedding models a memspace server can embed text with: each name with the dimension of
its vectors. Both sides read this table: the operator to give a space with `spec.embedding` its
dimension (and to refuse a model the platform does not offer), the server to load the model.
A name stays bound to the same weights for ever: a space's stored vectors were made by it."""

from __future__ import annotations

import dataclasses
from typing import Final


@dataclasses.dataclass(frozen=True)
class Model:
    name: str
    dim: int
    """Length of every vector the model makes."""
    package: str
    """The PyPI distribution that carries the weights (installed with the server)."""
    description: str


WORDLLAMA_L2_256: Final = Model(
    name="wordllama-l2-256",
    dim=256,
    package="wordllama",
    description="WordLlama l2_supercat at 256 dimensions: token embeddings distilled from a "
    "large language model, mean-pooled (16 MB of weights, no neural network at run time)",
)

MODELS: Final[dict[str, Model]] = {model.name: model for model in (WORDLLAMA_L2_256,)}
"""Every model this version knows, by name."""

DEFAULT_MODEL: Final = WORDLLAMA_L2_256.name


NONE: Final = "none"
"""The list of offered models that offers none (an empty setting means the default)."""


def offered(setting: str) -> tuple[str, ...]:
    """The model names of a comma-separated setting (`NONE`: no model)."""
    names = tuple(name.strip() for name in setting.split(",") if name.strip())
    return () if names == (NONE,) else names


class UnknownModelError(ValueError):
    """A model name that is not in the table (or not among the ones offered)."""


def lookup(name: str, offered: tuple[str, ...] | None = None) -> Model:
    """The model called `name`, if it is known and (when `offered` is given) offered."""
    allowed = tuple(MODELS) if offered is None else tuple(n for n in offered if n in MODELS)
    if name not in allowed:
        listed = ", ".join(allowed) or "none"
        raise UnknownModelError(
            f"embedding model {name[:80]!r} is not offered here; offered: {listed}"
        )
    return MODELS[name]
