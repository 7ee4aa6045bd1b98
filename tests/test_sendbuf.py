"""The send buffers (sendbuf.py): what goes to ZeroMQ zero-copy, and shared by every neighbour's send."""
import numpy as np
import torch
import zmq

from deca_p2p.sendbuf import share_payloads


def test_share_payloads_wraps_only_what_zeromq_would_not_copy_without_copying_it():
    big = torch.arange(zmq.COPY_THRESHOLD // 4, dtype=torch.float32)  # exactly the threshold: zero-copy
    small = torch.ones(zmq.COPY_THRESHOLD // 4 - 1)
    header = b"header"
    frames = [header, memoryview(big.numpy()).cast("B"), memoryview(small.numpy()).cast("B")]
    out = share_payloads(frames)
    assert out[0] is header and out[2] is frames[2]  # the header and the small payload untouched (copied at send)
    assert isinstance(out[1], zmq.Frame)
    # the same memory, not a copy: a Frame shared by every send instead of one per neighbour
    assert np.shares_memory(np.frombuffer(out[1].buffer, dtype=np.uint8), big.numpy())


def test_one_shared_frame_reaches_two_sockets_intact():
    ctx = zmq.Context()
    try:
        pull = [ctx.socket(zmq.PULL) for _ in range(2)]
        push = [ctx.socket(zmq.PUSH) for _ in range(2)]
        for a, b in zip(push, pull):
            port = b.bind_to_random_port("tcp://127.0.0.1")
            a.connect(f"tcp://127.0.0.1:{port}")
        data = torch.randn(100_000)
        frames = share_payloads([b"h", memoryview(data.numpy()).cast("B")])
        for s in push:
            s.send_multipart(frames, copy=False)
        for s in pull:
            assert s.poll(5000)
            got = s.recv_multipart()
            assert got[0] == b"h" and got[1] == data.numpy().tobytes()
    finally:
        ctx.destroy(linger=0)
