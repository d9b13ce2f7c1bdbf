"""Device commands and their lifecycle, from request to the device's result."""
