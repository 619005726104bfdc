"""The band-split RoFormer lineage: BS-RoFormer (`bs_roformer`) and Mel-Band RoFormer
(`mel_roformer`), weight-compatible with the community checkpoints (MSST, UVR, audio-separator),
with the importer of those checkpoints (`demixlab import msst`)."""
from ..registry import Family, register_family
from .importer import import_msst
from .model import BSRoformer, MelBandRoformer, build_roformer_objective

register_family(Family(name="bs_roformer", model_class=BSRoformer, build_objective=build_roformer_objective,
                       importers={"msst": import_msst}))
register_family(Family(name="mel_roformer", model_class=MelBandRoformer, build_objective=build_roformer_objective,
                       importers={"msst": import_msst}))
