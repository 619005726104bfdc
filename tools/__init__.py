"""Shims kept for older scripts: `python -m tools.NAME` runs the matching `demixlab` subcommand."""
