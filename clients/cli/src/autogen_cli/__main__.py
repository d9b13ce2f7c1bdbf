"""`python -m autogen_cli`: the same as the `autogen` command."""

from autogen_cli.app import main

main()
