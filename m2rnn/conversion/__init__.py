"""Deprecated: moved to `m2rnn.apps.conversion`; importing `m2rnn.conversion` (or a module in it) warns once and returns the
module at the new path."""

from m2rnn._deprecated import alias_module

alias_module(__name__, "m2rnn.apps.conversion")
