"""Identity, dealer scope, login and API tokens; verifies requests for the API gateway."""
