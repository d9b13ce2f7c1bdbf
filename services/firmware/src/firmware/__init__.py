"""Firmware consoles, releases, test-device validations and rollouts."""
