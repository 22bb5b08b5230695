"""Subcommands of the `clinfusediff` command (one module each; light imports only)."""
