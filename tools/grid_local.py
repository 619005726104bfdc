"""`python -m tools.grid_local ...` is `demixlab grid-local ...` (kept for scripts written before it)."""
from demixlab.commands.grid_local import main  # noqa: F401

if __name__ == "__main__":
    main()
