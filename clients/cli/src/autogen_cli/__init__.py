"""autogen: the ops command line of AutoGen Fleet, over the public HTTP API only."""
