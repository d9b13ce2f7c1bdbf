"""The dealer web console, server-rendered over the public API."""
