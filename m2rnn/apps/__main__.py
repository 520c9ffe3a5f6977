"""`python -m m2rnn.apps` runs the `m2rnn` console script."""

from .cli import main

raise SystemExit(main())
