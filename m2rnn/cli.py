"""Where the installed `m2rnn` console script of an older install points: forwards to `m2rnn.apps.cli.main`."""

from m2rnn.apps.cli import main

__all__ = ["main"]
