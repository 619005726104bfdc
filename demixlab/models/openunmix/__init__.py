"""The Open-Unmix lineage: Open-Unmix (`umx`) and CrossNet-Open-Unmix (`xumx`), with the importer
of Open-Unmix's own weights (`demixlab import openunmix`)."""
from ..registry import Family, register_family
from .importer import import_openunmix
from .umx import UMX, build_umx_objective, calibrate_umx
from .xumx import XUMX, build_xumx_objective

register_family(Family(name="umx", model_class=UMX, build_objective=build_umx_objective, calibrate=calibrate_umx,
                       importers={"openunmix": import_openunmix}))
register_family(Family(name="xumx", model_class=XUMX, build_objective=build_xumx_objective,
                       calibrate=calibrate_umx))
