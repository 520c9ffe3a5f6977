"""Deprecated: moved to `m2rnn.apps.output`; importing `m2rnn.utils` warns once and returns that module."""

from m2rnn._deprecated import alias_module

alias_module(__name__, "m2rnn.apps.output")
