"""Transfer paths without a GPU: host, staged and direct frames, device choice, CUDA-aware decision."""

import numpy as np
import pytest
from mpi4py import MPI

from hpcfed.runtime.comm import HEADER, Frame, Kind, Tag
from hpcfed.runtime.transport import Transport
from hpcfed.runtime.device import cuda_aware_decision, select_device
from hpcfed.runtime.memory import HostCudaView, Memory, choose_transfer

TRANSFERS = ["host", "staged", "direct"]


@pytest.mark.parametrize("transfer", TRANSFERS)
def test_frames_round_trip_on_every_path(transfer):
    memory = Memory(transfer)
    frame = Frame(64, memory)
    parts = [np.arange(5, dtype=np.float32), np.array([9, 8], dtype=np.uint8)]
    nbytes = frame.write(parts, step=3, kind=Kind.GRADIENT, sender=2, block=1, metric=0.25)
    assert nbytes == HEADER.itemsize + 22
    assert np.array_equal(frame.buffer[:HEADER.itemsize], frame.head.view(np.uint8))   # header went into the message
    data = frame.data()
    assert np.array_equal(data[:20].view(np.float32), parts[0]) and list(data[20:]) == [9, 8]
    in_frame = np.shares_memory(data, frame.buffer)
    assert (not in_frame and np.shares_memory(data, frame.twin)) if transfer == "staged" else in_frame


def test_direct_frames_mirror_the_header_and_refresh_it_on_arrival():
    sent, received = Frame(16, Memory("direct")), Frame(16, Memory("direct"))
    assert not np.shares_memory(sent.head, sent.buffer)
    sent.write(np.arange(4, dtype=np.float32), step=11, kind=Kind.UPDATE, sender=0, version=2)
    received.buffer[:] = sent.buffer        # what MPI would deliver into device memory
    assert received.field("step") == 0      # the host mirror is stale until arrived()
    received.arrived()
    assert (received.field("step"), received.field("version"), received.field("length")) == (11, 2, 16)


def test_direct_hands_mpi_only_a_cuda_array_interface():
    view = Memory("direct").frame_buffer(32)[:8]
    exposed = Memory("direct").for_mpi(view)
    assert isinstance(exposed, HostCudaView)
    interface = exposed.__cuda_array_interface__
    assert interface["data"][0] == view.ctypes.data and interface["shape"] == (8,) and interface["typestr"] == "|u1"
    with pytest.raises(TypeError):
        memoryview(exposed)   # no buffer protocol: mpi4py must take the CUDA-array path
    assert Memory("host").for_mpi(view) is view and Memory("staged").for_mpi(view) is view


@pytest.mark.parametrize("transfer", TRANSFERS)
def test_frames_travel_through_mpi_on_every_path(transfer):
    memory = Memory(transfer)
    channel = Transport(MPI.COMM_SELF)
    outbox, inbox = Frame(40, memory), Frame(40, memory)
    values = np.linspace(-1, 1, 10, dtype=np.float32)
    nbytes = outbox.write(values, step=5, kind=Kind.GRADIENT, sender=0, block=3)
    request = channel.irecv(inbox, 0, Tag.UPLINK)
    channel.send(outbox, nbytes, 0)
    request.Wait()
    inbox.arrived()
    assert inbox.field("step") == 5 and inbox.field("block") == 3
    assert np.array_equal(inbox.data().view(np.float32), values)
    assert channel.bytes_sent == nbytes


@pytest.mark.parametrize("transfer", TRANSFERS)
def test_start_up_arrays_arrive_on_every_path(transfer):
    channel = Transport(MPI.COMM_SELF)
    arrays = {"x": np.arange(24, dtype=np.float32).reshape(2, 3, 4), "y": np.array([1, 0], dtype=np.int64)}
    requests = []

    def send():   # send_arrays is blocking; COMM_SELF needs the receive posted first, so go through a buffer
        MPI.Attach_buffer(MPI.buffer.allocate(1 << 16))
        channel.comm.bsend({k: (a.dtype.str, a.shape) for k, a in arrays.items()}, dest=0, tag=int(Tag.DATA))
        for a in arrays.values():
            requests.append(channel.comm.Ibsend(a, dest=0, tag=int(Tag.DATA)))

    send()
    received = channel.recv_arrays(0, Memory(transfer))
    MPI.Request.Waitall(requests)
    MPI.Detach_buffer()
    assert all(np.array_equal(received[k], arrays[k]) and received[k].dtype == arrays[k].dtype for k in arrays)


@pytest.mark.parametrize("transfer", ["staged", "direct"])
def test_no_buffer_is_allocated_per_step(transfer):
    memory = Memory(transfer)
    frame = Frame(4000, memory)
    before = memory.allocations
    for step in range(20):
        frame.write(np.full(1000, step, dtype=np.float32), step=step, kind=Kind.GRADIENT, sender=1)
        frame.arrived()
        assert frame.data().view(np.float32)[0] == step
    assert memory.allocations == before == (2 if transfer == "staged" else 1)   # frame (+ its device twin)
    assert Frame(8, memory, receives=False).twin is None   # send-only frames need no twin


@pytest.mark.parametrize("setting, on_gpu, aware, expected", [
    ("auto", False, True, "host"), ("auto", True, True, "direct"), ("auto", True, False, "staged"),
    ("staged", True, True, "staged"), ("direct", False, False, "direct"), ("staged", False, False, "staged"),
])
def test_transfer_choice(setting, on_gpu, aware, expected):
    assert choose_transfer(setting, on_gpu, aware) == expected


@pytest.mark.parametrize("setting, aware, message", [("host", True, "'host' needs CPU ranks"),
                                                     ("direct", False, "needs CUDA-aware MPI")])
def test_impossible_transfer_is_refused(setting, aware, message):
    with pytest.raises(ValueError, match=message):
        choose_transfer(setting, True, aware)


def test_device_selection_by_node_local_rank():
    assert select_device("cpu", 3, "SLURM_LOCALID", 4, True).device == "cpu"
    picked = [select_device("auto", r, "SLURM_LOCALID", 4, True) for r in range(6)]
    assert [p.device for p in picked] == ["cuda:0", "cuda:1", "cuda:2", "cuda:3", "cuda:0", "cuda:1"]
    assert "SLURM_LOCALID 5 of a node with 4 GPU(s)" == picked[5].reason
    assert select_device("auto", 1, "node-local rank", 0, False).device == "cpu"
    assert select_device("auto", 1, "node-local rank", 2, False).reason == \
        "auto: cupy is not installed (pip install 'hpcfed[gpu]')"
    with pytest.raises(ValueError, match="torch sees no CUDA GPU"):
        select_device("cuda", 0, "node-local rank", 0, False)


def test_cuda_aware_decision_order(monkeypatch):
    monkeypatch.delenv("HPCFED_CUDA_AWARE", raising=False)
    plain = cuda_aware_decision()
    assert not plain.cuda_aware and "mpi_memory_alloc_kinds=" in plain.reason   # the PyPI MPICH wheel
    assert "MPIX_Query_cuda_support() = 0" in plain.reason
    assert cuda_aware_decision("true").cuda_aware and not cuda_aware_decision("false").cuda_aware
    assert cuda_aware_decision("true").reason == "set by config=true"
    monkeypatch.setenv("HPCFED_CUDA_AWARE", "0")
    assert cuda_aware_decision("auto").reason == "set by HPCFED_CUDA_AWARE=0"
    assert cuda_aware_decision("true").cuda_aware   # the config wins over the environment
