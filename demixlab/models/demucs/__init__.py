"""The Demucs lineage: Hybrid Demucs v3 (`hdemucs`) and Hybrid Transformer Demucs v4 (`htdemucs`),
weight-compatible with PyPI demucs 4.1.0, with the importer of its model packages
(`demixlab import demucs`)."""
from ..registry import Family, register_family
from .hdemucs import HDemucs, build_demucs_objective
from .htdemucs import HTDemucs
from .importer import import_demucs_paths

register_family(Family(name="hdemucs", model_class=HDemucs, build_objective=build_demucs_objective,
                       importers={"demucs": import_demucs_paths}))
register_family(Family(name="htdemucs", model_class=HTDemucs, build_objective=build_demucs_objective,
                       importers={"demucs": import_demucs_paths}))
