"""`python -m tools.test_pretrained ...` is `demixlab evaluate ...` (kept for scripts written before it)."""
from demixlab.commands.evaluate import main  # noqa: F401

if __name__ == "__main__":
    main()
