"""The product catalog the registry and the firmware consoles share."""

import pytest

from common.catalog import MODELS, check_variant, models_of


def test_consoles_cover_the_manual() -> None:
    assert models_of("xpro") == ("X Pro",)
    assert models_of("unified") == ("D100", "D180", "V100", "V5")
    assert models_of("ultra") == ("Ultra",)
    assert set(MODELS) == {"X Pro", "D100", "D180", "V100", "V5", "Ultra"}


@pytest.mark.parametrize(
    ("model", "engine", "transport"),
    [("X Pro", None, "gsm"), ("D180", "diesel", "wifi"), ("Ultra", None, "wifi")],
)
def test_real_products_pass(model: str, engine: str | None, transport: str) -> None:
    assert check_variant(model, engine, transport) is None


@pytest.mark.parametrize(
    ("model", "engine", "transport", "field"),
    [
        ("X 9000", None, "gsm", "model"),
        ("D100", None, "gsm", "engine"),
        ("D100", "steam", "gsm", "engine"),
        ("Ultra", "diesel", "wifi", "engine"),
        ("V5", "gas", "lora", "transport"),
    ],
)
def test_impossible_products_name_the_field(
    model: str, engine: str | None, transport: str, field: str
) -> None:
    reason = check_variant(model, engine, transport)
    assert reason is not None
    assert reason.startswith(f"{field}:")
