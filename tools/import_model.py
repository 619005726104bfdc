"""`python -m tools.import_model ...` is `demixlab import ...` (kept for scripts written before it)."""
from demixlab.commands.import_model import main  # noqa: F401

if __name__ == "__main__":
    main()
