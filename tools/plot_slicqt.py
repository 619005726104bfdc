"""`python -m tools.plot_slicqt ...` is `demixlab plot-slicqt ...` (kept for scripts written before it)."""
from demixlab.commands.plot_slicqt import main  # noqa: F401

if __name__ == "__main__":
    main()
