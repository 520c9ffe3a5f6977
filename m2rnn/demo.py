"""Deprecated: moved to `m2rnn.apps.demo`; importing `m2rnn.demo` warns once and returns that module."""

from m2rnn._deprecated import alias_module

alias_module(__name__, "m2rnn.apps.demo")
