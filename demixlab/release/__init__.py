"""Release: trained models as safe files, repositories of them, bags, and imported weights.

Owns the model file format (:mod:`.model_file`: plain tensors and containers, loaded with
`weights_only=True`, the family named by its registry string), model repositories and the
definition and validation of bags (:mod:`.repository`), and turning a family importer's output
into a model file (:mod:`.importing`). Imports :mod:`demixlab.models` and the base modules;
running a bag belongs to :mod:`demixlab.separation`, exporting an XP to :mod:`demixlab.training`.
"""
