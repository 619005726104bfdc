"""`python -m demixlab ...` is the `demixlab` command."""
from .commands import main

main()
