"""Subcommands of the ``shoal`` command line, one module each."""
