"""Process-level runtime settings for training (and long CPU jobs): the memory allocator and
oneDNN's cache of compiled kernels."""
import ctypes
import logging
import os

logger = logging.getLogger(__name__)

_M_TRIM_THRESHOLD = -1
_M_TOP_PAD = -2
_M_MMAP_THRESHOLD = -3
# oneDNN (torch's CPU convolutions) compiles a kernel per layer shape and keeps 1024 of them by
# default. sliCQ-CDAE has 70 blocks of different shapes: forward and backward kernels overflow that
# cache, and every step recompiled them (CPU step 3.9 s -> 1.5 s with a larger cache).
ONEDNN_CACHE_CAPACITY = "4096"


def tune_cpu_runtime() -> None:
    """For training: keep freed memory (:func:`keep_freed_memory`) and enlarge oneDNN's kernel
    cache (:func:`enlarge_kernel_cache`)."""
    enlarge_kernel_cache()
    keep_freed_memory()


def enlarge_kernel_cache() -> None:
    """Let oneDNN keep more compiled kernels (unless the environment sets
    `ONEDNN_PRIMITIVE_CACHE_CAPACITY`). Only effective before the process' first convolution:
    oneDNN reads the setting when it creates its cache."""
    os.environ.setdefault("ONEDNN_PRIMITIVE_CACHE_CAPACITY", ONEDNN_CACHE_CAPACITY)


def keep_freed_memory() -> None:
    """Ask glibc to keep freed memory instead of returning it to the OS.

    By default glibc serves each large tensor with a fresh mmap and unmaps it when freed, so
    every training step faults hundreds of MB of pages back in: on CPU that was a quarter of
    the step time (UMX, batch 8 x 2 s: 2.26 s -> 1.75 s per step with this). The price is that
    the process keeps its peak memory. No-op where glibc is not the allocator.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return
    max_int = 2 ** 31 - 1
    ok = all([mallopt(_M_MMAP_THRESHOLD, ctypes.c_int(max_int)), mallopt(_M_TRIM_THRESHOLD, ctypes.c_int(max_int)),
              mallopt(_M_TOP_PAD, ctypes.c_int(2 ** 30))])
    if not ok:
        logger.debug("mallopt refused some settings; freed memory may be returned to the OS")
