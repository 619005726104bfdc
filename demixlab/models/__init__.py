"""Model families: everything that turns a mixture into stems, and nothing that trains or serves them.

Owns the model contract (:mod:`.contract`), the family registry with each family's declared
options (:mod:`.registry`), the losses families share (:mod:`.losses`) and the families
themselves, one subpackage per lineage (:mod:`.openunmix`, :mod:`.demucs`, :mod:`.slicq`, :mod:`.roformer`), each
with its importers of other implementations' weights. Imports only :mod:`demixlab.spectral` and
the base modules (errors, files). Importing this package registers every built-in family.
"""
from . import demucs, openunmix, roformer, slicq  # each registers its families
from .contract import ImportedModel, ModelStreamer, NetworkAxes, SeparationModel
from .registry import Family, family_names, get_family, get_importer, import_formats, register_family

__all__ = ["Family", "ImportedModel", "ModelStreamer", "NetworkAxes", "SeparationModel", "demucs", "family_names", "get_family", "get_importer",
           "import_formats", "openunmix", "register_family", "roformer", "slicq"]
