"""demixlab: a Hydra/Dora experiment platform for music source separation."""

__version__ = "0.1.0"
