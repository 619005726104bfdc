"""Training: turning a configuration into a trained XP, and an XP into a model file.

Owns the configuration schema (:mod:`.config`), the generic solver loop (:mod:`.solver`) with its
checkpoints (:mod:`.checkpoint`), validation and test (:mod:`.validation`) and reporting
(:mod:`.reporting`, :mod:`.plots`), optimizers, schedules and EMAs (:mod:`.optim`), augmentations
(:mod:`.augment`), multi-process helpers (:mod:`.distrib`), the allocator setting
(:mod:`.allocator`), the export of XPs as model files (:mod:`.export`) and their comparison
(:mod:`.compare`). The top stage: it may import every other stage (data, models, separation,
evaluation, release); none imports it.
"""
