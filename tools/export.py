"""`python -m tools.export ...` is `demixlab export ...` (kept for scripts written before it)."""
from demixlab.commands.export import main  # noqa: F401
from demixlab.training.export import export, find_xp_folder  # noqa: F401

if __name__ == "__main__":
    main()
