"""The sliCQ lineage: xumx-sliCQ-V2's convolutional denoising autoencoders on the sliced
constant-Q transform (`slicq_cdae`), with the importer of its weights (`demixlab import xumx_slicq`)
the ONNX export of its mask network, and the realtime model on a live stream (:mod:`.streaming`)."""
from ..registry import Family, register_family
from .cdae import SliCQCDAE, build_slicq_cdae_objective, calibrate_slicq_cdae
from .importer import import_xumx_slicq_paths

register_family(Family(name="slicq_cdae", model_class=SliCQCDAE, build_objective=build_slicq_cdae_objective,
                       calibrate=calibrate_slicq_cdae, importers={"xumx_slicq": import_xumx_slicq_paths}))
