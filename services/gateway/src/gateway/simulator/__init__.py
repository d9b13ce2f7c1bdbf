"""Simulated AutoGen controllers speaking the device protocol (`python -m gateway.simulator`)."""
