"""Separation: running models and bags on audio of any length, in bounded memory.

Owns the chunked overlap-add application of a model (:mod:`.chunking`), running a bag of models
blended per source (:mod:`.bags`), the Python API (:class:`.separator.Separator`: any rate and
channel count in, stems out), streamed separation of inputs that arrive in blocks
(:mod:`.streaming`), live streams through causal models at a fixed latency
(:mod:`.realtime`) and what gets written (:mod:`.output`). Imports
:mod:`demixlab.release`, :mod:`demixlab.models` and the base modules.
"""
from .bags import apply_bag, bag_separator
from .chunking import apply_model
from .realtime import StreamingSeparator
from .separator import Separator, resolve_device
from .streaming import stream_model

__all__ = ["Separator", "StreamingSeparator", "apply_bag", "apply_model", "bag_separator", "resolve_device",
           "stream_model"]
