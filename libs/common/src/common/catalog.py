"""The product catalog: controller models, their firmware console, engines and transports.

Product data, not a rule of any one service: the fleet service validates registrations against
it and the firmware service builds its three consoles from it.
"""

from dataclasses import dataclass
from typing import Literal

Console = Literal["xpro", "unified", "ultra"]
Transport = Literal["gsm", "wifi"]

TRANSPORTS: tuple[Transport, ...] = ("gsm", "wifi")


@dataclass(frozen=True)
class Model:
    """A controller model and the console its firmware is released through."""

    name: str
    console: Console
    engines: tuple[str, ...]  # empty: the model has no engine variants
    transports: tuple[Transport, ...]


# Engines the Unified controllers drive; a Unified release names one of them.
UNIFIED_ENGINES: tuple[str, ...] = ("diesel", "gas", "dual-fuel")

MODELS: dict[str, Model] = {
    m.name: m
    for m in (
        Model("X Pro", "xpro", (), TRANSPORTS),
        Model("D100", "unified", UNIFIED_ENGINES, TRANSPORTS),
        Model("D180", "unified", UNIFIED_ENGINES, TRANSPORTS),
        Model("V100", "unified", UNIFIED_ENGINES, TRANSPORTS),
        Model("V5", "unified", UNIFIED_ENGINES, TRANSPORTS),
        Model("Ultra", "ultra", (), TRANSPORTS),
    )
}

CONSOLE_TITLES: dict[Console, str] = {"xpro": "X Pro", "unified": "Unified", "ultra": "Ultra"}


def models_of(console: Console) -> tuple[str, ...]:
    """Model names whose firmware goes through `console`."""
    return tuple(name for name, model in MODELS.items() if model.console == console)


def check_variant(model: str, engine: str | None, transport: str) -> str | None:
    """Why (model, engine, transport) is not a product that exists, or None if it is."""
    found = MODELS.get(model)
    if found is None:
        return f"model: unknown model {model!r}; one of {', '.join(MODELS)}"
    if transport not in found.transports:
        return f"transport: {model} comes with {' or '.join(found.transports)}, not {transport!r}"
    if found.engines:
        if engine is None:
            return f"engine: {model} needs an engine, one of {', '.join(found.engines)}"
        if engine not in found.engines:
            return f"engine: {model} has no engine {engine!r}; one of {', '.join(found.engines)}"
    elif engine is not None:
        return f"engine: {model} has no engine variants"
    return None
