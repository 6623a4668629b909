"""The GPU subset: runs on a machine with a CUDA GPU and CuPy (skipped elsewhere).

    python -m pytest -m gpu tests/gpu tests/unit/test_codec.py
"""

import json

import numpy as np
import pytest
import torch
from mpi4py import MPI

from conftest import run_mpi
from hpcfed.runtime.comm import Frame, Kind, Tag
from hpcfed.runtime.transport import Transport
from hpcfed.runtime.device import as_array, as_tensor, cuda_aware_decision, cupy_or_none
from hpcfed.runtime.memory import Memory

cp = cupy_or_none()
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(cp is None or not torch.cuda.is_available(),
                                                  reason="no CUDA GPU with CuPy and torch CUDA")]


def test_torch_and_cupy_share_memory_through_dlpack():
    tensor = torch.arange(10, dtype=torch.float32, device="cuda")
    array = as_array(tensor, cp)
    assert array.data.ptr == tensor.data_ptr()
    array *= 2   # visible to torch: same memory
    assert torch.equal(tensor, 2 * torch.arange(10, dtype=torch.float32, device="cuda"))
    assert as_tensor(array).data_ptr() == tensor.data_ptr()


def test_staged_frames_are_pinned_and_copied_through_a_device_twin():
    memory = Memory("staged", cp)
    frame = Frame(4 * 1000, memory)
    attributes = cp.cuda.runtime.pointerGetAttributes(frame.buffer.ctypes.data)
    assert attributes.type == cp.cuda.runtime.memoryTypeHost   # page-locked host memory
    packet = cp.arange(1000, dtype=cp.float32)
    frame.write(packet, step=1, kind=Kind.GRADIENT, sender=1)
    data = frame.data()
    assert isinstance(data, cp.ndarray) and data.data.ptr == frame.twin.data.ptr
    assert cp.array_equal(data.view(cp.float32), packet)


def test_direct_frames_live_on_the_device():
    frame = Frame(64, Memory("direct", cp))
    frame.write(cp.ones(4, dtype=cp.float32), step=3, kind=Kind.UPDATE, sender=0)
    assert isinstance(frame.buffer, cp.ndarray) and frame.field("step") == 3
    assert cp.array_equal(frame.data().view(cp.float32), cp.ones(4, dtype=cp.float32))


@pytest.mark.skipif(not cuda_aware_decision().cuda_aware, reason="MPI is not CUDA-aware")
def test_device_frames_travel_through_cuda_aware_mpi():
    memory = Memory("direct", cp)
    channel = Transport(MPI.COMM_SELF)
    outbox, inbox = Frame(4 * 256, memory), Frame(4 * 256, memory)
    values = cp.linspace(-1, 1, 256, dtype=cp.float32)
    nbytes = outbox.write(values, step=2, kind=Kind.GRADIENT, sender=0)
    request = channel.irecv(inbox, 0, Tag.UPLINK)
    channel.send(outbox, nbytes, 0)
    request.Wait()
    inbox.arrived()
    assert inbox.field("step") == 2 and cp.array_equal(inbox.data().view(cp.float32), values)


@pytest.mark.mpi
@pytest.mark.parametrize("transfer", ["auto", "staged"])
def test_quickstart_trains_on_the_gpu_like_on_the_cpu(tmp_path, transfer):
    accuracy = {}
    for device in ("cuda", "cpu"):
        out = tmp_path / device
        result = run_mpi(4, ["run", "--set", f"device={device}", "--set", f"mpi.transfer={transfer}",
                             "--set", f"output.dir={out}"], timeout=300)
        assert result.returncode == 0, result.stderr
        summary = json.loads((out / "summary.json").read_text())
        assert summary["replicas_identical"]
        accuracy[device] = summary["final_accuracy"]
    assert accuracy["cuda"] >= 0.95 and abs(accuracy["cuda"] - accuracy["cpu"]) <= 0.01, accuracy


@pytest.mark.mpi
def test_compressed_run_on_the_gpu(tmp_path):
    result = run_mpi(3, ["run", "--set", "device=cuda", "--set", "compression.enabled=true",
                         "--set", "train.steps=60", "--set", f"output.dir={tmp_path}"], timeout=300)
    assert result.returncode == 0, result.stderr
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["replicas_identical"] and summary["kernel_bytes"] > 0 and np.isfinite(summary["final_test_loss"])
