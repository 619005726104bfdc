"""Dora grids (`dora grid NAME`): one module per sweep; modules starting with `_` are helpers."""
