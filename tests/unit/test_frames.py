"""Framed messages: header + payload round trip without MPI traffic."""

import numpy as np
import pytest

from hpcfed.runtime.comm import HEADER, Frame, Kind


def test_frame_round_trip():
    frame = Frame(4 * 10)
    values = np.arange(10, dtype=np.float32)
    nbytes = frame.write(values, step=7, kind=Kind.GRADIENT, sender=3, block=2, version=1, metric=0.5)
    assert nbytes == HEADER.itemsize + 40 == 88
    assert np.array_equal(frame.payload(np.float32), values)
    assert (frame.field("step"), frame.field("sender"), frame.field("block"), frame.field("metric")) == (7, 3, 2, 0.5)


def test_frame_lays_parts_end_to_end():
    frame = Frame(64)
    nbytes = frame.write([np.arange(3, dtype=np.float32), np.array([7, 8], dtype=np.uint8)], step=1,
                         kind=Kind.UPDATE, sender=0)
    assert nbytes == HEADER.itemsize + 14 and frame.field("length") == 14
    assert np.array_equal(frame.payload()[:12].view(np.float32), [0, 1, 2]) and list(frame.payload()[12:]) == [7, 8]


def test_frame_rejects_oversized_payload():
    with pytest.raises(ValueError, match="exceeds the frame capacity"):
        Frame(8).write(np.zeros(3, dtype=np.float32), step=0, kind=Kind.UPDATE, sender=0)
