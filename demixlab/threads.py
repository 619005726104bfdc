"""Independent pieces of CPU inference on several cores: threads of one intra-op thread each.

Many small tensor operations (the Wiener filter's tiles of bins) or a batch-1 LSTM (one
Open-Unmix target network) keep at most one core busy: torch's intra-op threads only add
barriers between the small operations, and on a loaded machine an OpenMP team waits for its
slowest thread at each of them. Running the independent pieces side by side, each on one
intra-op thread, uses the cores instead; the results are those of running them in order. The
chunked separation (:mod:`demixlab.separation.chunking`) runs its chunks this way too.
"""
import typing as tp
from concurrent.futures import ThreadPoolExecutor

import torch

Item = tp.TypeVar("Item")
Result = tp.TypeVar("Result")


def map_in_threads(function: tp.Callable[[Item], Result], items: tp.Sequence[Item],
                   workers: tp.Optional[int] = None) -> tp.List[Result]:
    """`[function(item) for item in items]`, spread over `workers` threads (default: torch's
    intra-op thread count) that each run torch with their share of the caller's intra-op threads
    (one each by default, see :func:`shared_thread_pool`) and the caller's grad and inference
    modes. With fewer than two workers or items: in order, in this thread."""
    workers = min(torch.get_num_threads() if workers is None else workers, len(items))
    if workers < 2:
        return [function(item) for item in items]
    grad, inference = torch.is_grad_enabled(), torch.is_inference_mode_enabled()

    def call(item: Item) -> Result:
        # Grad and inference modes are per thread; the thread count is per thread with OpenMP.
        with torch.inference_mode(inference), torch.set_grad_enabled(grad):
            return function(item)

    with shared_thread_pool(workers) as pool:
        return list(pool.map(call, items))


def shared_thread_pool(workers: int) -> ThreadPoolExecutor:
    """A pool of `workers` threads that share the caller's torch intra-op threads: each runs torch
    with `torch.get_num_threads() // workers` of them (at least one), so that pieces of work side by
    side do not ask for more threads than the caller has."""
    threads = max(1, torch.get_num_threads() // workers)
    return ThreadPoolExecutor(workers, initializer=torch.set_num_threads, initargs=(threads,))
