"""The device registry: identity, ownership, live state, search and the map."""
