"""demixlab.threads: independent pieces of inference side by side, one intra-op thread each."""
import threading

import torch

from demixlab.threads import map_in_threads


def test_map_in_threads_keeps_order_and_modes():
    caller_threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        seen = []

        def piece(index: int):
            seen.append((threading.get_ident(), torch.get_num_threads(), torch.is_grad_enabled(),
                         torch.is_inference_mode_enabled()))
            return index * index

        with torch.inference_mode():
            assert map_in_threads(piece, list(range(6))) == [0, 1, 4, 9, 16, 25]
        assert {entry[1:] for entry in seen} == {(1, False, True)}
        assert threading.get_ident() not in {entry[0] for entry in seen}
        seen.clear()
        with torch.no_grad():
            map_in_threads(piece, [1, 2])
        assert {entry[1:] for entry in seen} == {(1, False, False)}
        assert torch.get_num_threads() == 2  # the caller's count is its own
        seen.clear()
        assert map_in_threads(piece, [3], workers=4) == [9]  # one item: in this thread
        assert seen[0][0] == threading.get_ident() and seen[0][1] == 2
    finally:
        torch.set_num_threads(caller_threads)


def test_map_in_threads_raises_the_error_of_a_piece():
    def piece(index: int) -> int:
        if index == 2:
            raise ValueError("piece 2")
        return index

    try:
        map_in_threads(piece, [1, 2, 3], workers=2)
    except ValueError as error:
        assert str(error) == "piece 2"
    else:
        raise AssertionError("no error")
