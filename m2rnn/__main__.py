"""`python -m m2rnn` runs the `m2rnn` console script."""

from m2rnn.apps.cli import main

raise SystemExit(main())
