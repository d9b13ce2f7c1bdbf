"""The settings each controller model accepts over the air (`set_setting`): keys, types, ranges.

This table is the commands service's own: a key or value outside it never reaches a device.
"""

from dataclasses import dataclass
from typing import Any, Literal


@dataclass(frozen=True)
class SettingSpec:
    """One setting a model accepts: its type and its range or choices."""

    kind: Literal["int", "float", "bool", "choice"]
    minimum: float | None = None
    maximum: float | None = None
    choices: tuple[str, ...] = ()

    def check(self, value: Any) -> str | None:  # noqa: PLR0911 - one answer per rule
        """Why `value` is not acceptable, or None."""
        if self.kind == "bool":
            return None if isinstance(value, bool) else "must be true or false"
        if self.kind == "choice":
            if isinstance(value, str) and value in self.choices:
                return None
            return f"must be one of {', '.join(self.choices)}"
        numeric = isinstance(value, int | float) and not isinstance(value, bool)
        if not numeric or (self.kind == "int" and not isinstance(value, int)):
            return f"must be {'an integer' if self.kind == 'int' else 'a number'}"
        if self.minimum is not None and value < self.minimum:
            return f"must be at least {self.minimum:g}"
        if self.maximum is not None and value > self.maximum:
            return f"must be at most {self.maximum:g}"
        return None


_COMMON_SETTINGS: dict[str, SettingSpec] = {
    "telemetry_interval_s": SettingSpec("int", 10, 3600),
    "exercise_interval_days": SettingSpec("int", 0, 60),
    "exercise_duration_min": SettingSpec("int", 5, 60),
    "auto_start_on_mains_fail": SettingSpec("bool"),
    "crank_attempts": SettingSpec("int", 1, 10),
    "cooldown_s": SettingSpec("int", 0, 900),
    "low_battery_alarm_v": SettingSpec("float", 9.0, 26.0),
}
_FUEL_SETTINGS: dict[str, SettingSpec] = {
    "low_fuel_alarm_pct": SettingSpec("int", 5, 50),
    "start_delay_s": SettingSpec("int", 0, 300),
}
# Per model: the keys a device of that model accepts over the air.
ALLOWED_SETTINGS: dict[str, dict[str, SettingSpec]] = {
    "X Pro": {**_COMMON_SETTINGS, "display_units": SettingSpec("choice", choices=("si", "us"))},
    "D100": {**_COMMON_SETTINGS, **_FUEL_SETTINGS},
    "D180": {**_COMMON_SETTINGS, **_FUEL_SETTINGS},
    "V100": {**_COMMON_SETTINGS, **_FUEL_SETTINGS},
    "V5": {**_COMMON_SETTINGS, **_FUEL_SETTINGS},
    "Ultra": {
        **_COMMON_SETTINGS,
        **_FUEL_SETTINGS,
        "gps_report_interval_s": SettingSpec("int", 30, 3600),
    },
}
