"""The uncompressed message is sized without hivemind, and must match hivemind's own serializer byte for byte."""

import subprocess
import sys

import pytest
import torch
from hivemind.compression import deserialize_torch_tensor, serialize_torch_tensor
from hivemind.proto import runtime_pb2

from trainer.compression import tensor_message_nbytes, transmit, transmit_topk


@pytest.mark.parametrize("shape", [(), (0,), (1,), (127,), (128,), (16_384,), (2_097_153,), (3, 0, 5), (300, 700)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.int32, torch.int16, torch.float16, torch.int64, torch.uint8])
def test_message_size_is_hiveminds(shape, dtype):
    tensor = torch.zeros(shape, dtype=dtype)
    expected = serialize_torch_tensor(tensor, runtime_pb2.CompressionType.NONE).ByteSize()
    assert tensor_message_nbytes(shape, dtype) == expected


def test_uncompressed_transmit_decodes_what_hivemind_decodes():
    tensor = torch.randn(3, 1000, generator=torch.Generator().manual_seed(1))
    sent = transmit(tensor, "none")
    message = serialize_torch_tensor(tensor, runtime_pb2.CompressionType.NONE)
    assert torch.equal(sent.tensor, deserialize_torch_tensor(message))
    assert sent.nbytes == len(message.SerializeToString())
    sent.tensor.add_(1.0)  # the receiver's copy is its own
    assert not torch.equal(sent.tensor, tensor)


def test_topk_bytes_are_two_hivemind_messages():
    tensor = torch.randn(10_000, generator=torch.Generator().manual_seed(2))
    sent = transmit_topk(tensor, 0.01)
    none = runtime_pb2.CompressionType.NONE
    assert sent.nbytes == (serialize_torch_tensor(torch.zeros(100, dtype=torch.int32), none).ByteSize()
                           + serialize_torch_tensor(torch.zeros(100), none).ByteSize())


def test_the_simulators_replicas_do_not_import_hivemind():
    # hivemind's import costs about a second in every process that hosts replicas.
    code = ("import sys, torch; from cluster.replica_hosts import ReplicaHost; from trainer.compression import transmit;"
            "transmit(torch.ones(4), 'none'); print('hivemind' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
