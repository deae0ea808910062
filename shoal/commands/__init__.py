"""Subcommands of ``shoal``, one module each (registered in ``shoal.cli``)."""
