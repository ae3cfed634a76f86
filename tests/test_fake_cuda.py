"""The `--device cuda` path, on a CPU: nodes and a client head whose tensors say they are on a GPU
(tests/fakecuda.py), so that a tensor of the wrong device, or a `.numpy()` of a GPU tensor, fails
here as it would on a GPU. No GPU has been lent to this project; review172 (sixty-second session)
ran this path so and found it right, and these tests keep it so. Results are exact: the kernels
are the CPU's."""

from __future__ import annotations

import logging

import pytest
import torch
from fakecuda import FakeCuda, on_gpu, patch_torch_cuda, to_gpu
from test_all_reduce import in_process_swarm
from test_heads import in_process_nodes

from nanoswarm.client.generate import ClientModel
from nanoswarm.client.session import InferenceSession
from nanoswarm.client.stages import RemoteLayerStage
from nanoswarm.node.handler import RequestHandler
from nanoswarm.node.server import NodeServer
from nanoswarm.node.sessions import NodeLimits
from nanoswarm.protocol.messages import decode, encode
from nanoswarm.shards.device import exact_float32, tf32_on
from nanoswarm.shards.manifest import read_manifest
from nanoswarm.shards.weights import load_blocks, load_embeddings, load_head


@pytest.fixture
def gpu_nodes(monkeypatch):
    """Node servers in this process's threads run with the fake GPU (a torch function mode is
    a thread's own); torch.cuda's memory and sync calls answered; yields those calls."""
    calls = patch_torch_cuda(monkeypatch)
    serve = NodeServer.serve_forever

    def serve_on_gpu(self, *args, **kwargs):
        with FakeCuda():
            return serve(self, *args, **kwargs)
    monkeypatch.setattr(NodeServer, "serve_forever", serve_on_gpu)
    return calls


def gpu_handler(model_dir, heads=None, dtype=torch.float32, name="n") -> RequestHandler:
    blocks = to_gpu(load_blocks(model_dir, 0, 4, heads=heads, dtype=dtype))
    with FakeCuda():  # the handler takes its device from its weights
        handler = RequestHandler(blocks, read_manifest(model_dir).model_id, name, NodeLimits())
        handler.measure_throughput(0.01)
    assert handler.steps.device.type == "cuda"
    return handler


def test_the_fake_gpu_refuses_what_a_gpu_would():
    """Else the tests below could not fail."""
    with FakeCuda():
        gpu, cpu = torch.zeros(2, 3, device="cuda"), torch.ones(2, 3)
        assert gpu.device.type == "cuda" and not gpu.is_cpu
        with pytest.raises(RuntimeError, match="same device"):
            gpu + cpu
        with pytest.raises(TypeError, match="numpy"):
            gpu.numpy()
        assert (gpu + 1).device.type == "cuda" and (gpu * torch.tensor(2.0)).device.type == "cuda"
        back = (gpu + 1).cpu()
        assert not on_gpu(back) and back.device.type == "cpu" and back.numpy().sum() == 6
        assert cpu.to("cuda").device.type == "cuda" and cpu.device.type == "cpu"
        gpu[:, :1] = cpu[:, :1]  # a copy across devices, as CUDA allows
        assert gpu.device.type == "cuda" and float(gpu.cpu()[0, 0]) == 1.0
        layer = to_gpu(torch.nn.Linear(3, 3))
        assert layer.weight.device.type == "cuda" and layer(gpu).device.type == "cuda"
        with pytest.raises(RuntimeError, match="same device"):
            layer(cpu)


@pytest.mark.parametrize("dtype,wires", [(torch.float32, ("float32", "float16", "bfloat16", "q80")),
                                         (torch.float16, ("float32",))])
def test_a_gpu_layer_node_serves_prompts_decode_and_rewinds(tiny_model_dir, gpu_nodes, dtype, wires):
    """Inputs go to the device and outputs come back in one copy before any frame, check or cut
    (`last`); the KV cache lives on the device; each reply format is made from the copy."""
    reference = load_blocks(tiny_model_dir, 0, 4)
    x = torch.randn(1, 9, 64, generator=torch.Generator().manual_seed(3))
    handler = gpu_handler(tiny_model_dir, dtype=dtype)
    tolerance = 1e-5 if dtype == torch.float32 else 2e-2
    with in_process_nodes([handler]) as [conn]:
        for wire in wires:
            stage = RemoteLayerStage(conn, 0, 4, handler.model_id, wire=wire)
            stage.open(16)
            cache = reference.new_cache(16)
            with torch.inference_mode():
                want = reference(x[:, :5], [cache])
            got = stage.step(x[:, :5], 0, last=1)
            assert got.shape == (1, 1, 64) and got.device.type == "cpu"
            session = handler.sessions.sessions[stage.session]  # on the device: the node ran on the fake GPU
            assert on_gpu(session.cache.k) and on_gpu(session.cache.v) and not session.maps
            worst = (got - want[:, -1:]).abs().max().item()
            for t in range(5, 9):
                with torch.inference_mode():
                    want = reference(x[:, t:t + 1], [cache])
                worst = max(worst, (stage.step(x[:, t:t + 1], t) - want).abs().max().item())
            again = stage.step(x[:, 8:9], 8, rewind=True)  # the cache on the device cut back
            worst = max(worst, (again - want).abs().max().item())
            stage.close()
            bound = tolerance if wire == "float32" else max(tolerance, 5e-2)
            assert worst < bound, (wire, worst)
    assert handler.steps.device_failure is None


def test_a_gpu_node_batches_refuses_bad_values_and_gives_memory_back(tiny_model_dir, gpu_nodes):
    """Two sessions' decode steps in one pass, a NaN input, a result that does not fit float16 and
    a stateless forward, handled on the device; closed sessions' cache memory given back."""
    handler = gpu_handler(tiny_model_dir)
    x = torch.randn(1, 3, 64, generator=torch.Generator().manual_seed(5))
    with FakeCuda():
        opened = [decode(handler.handle(b"c", encode("open", i, {"model_id": handler.model_id, "max_length": 8})))
                  for i in (1, 2)]
        sessions = [m.fields["session"] for m in opened]
        replies = handler.handle_batch([(b"c", encode("step", 10 + i, {"session": s, "pos": 0}, [x[:, i:i + 1]]))
                                        for i, s in enumerate(sessions)])
        assert [decode(frames).type for _, frames in replies] == ["result", "result"]
        assert handler.stats.batched_steps == 1 and handler.stats.max_batch == 2
        nan = x[:, :1].clone()
        nan[0, 0, 0] = float("nan")
        refused = decode(handler.handle(b"c", encode("step", 20, {"session": sessions[0], "pos": 1}, [nan])))
        assert refused.type == "error" and refused.fields["code"] == "bad_value"
        too_big = decode(handler.handle(b"c", encode("step", 21, {"session": sessions[0], "pos": 1,
                                                                  "wire": "float16"}, [x[:, :1] * 1e6])))
        assert too_big.type == "error" and too_big.fields["code"] == "bad_value"
        assert decode(handler.handle(b"c", encode("forward", 22, {"layers": [0, 4]}, [x]))).type == "result"
        assert handler.sessions.get(sessions[0], b"c").length == 1  # the refused steps changed nothing
        for s in sessions:
            handler.sessions.close(s)
        handler.expire_idle()
    assert "synchronize" in gpu_nodes and handler.steps.device_failure is None


@pytest.mark.parametrize("all_reduce", [True, False])
def test_a_gpu_head_group_all_reduces_or_fans_out_exactly(tiny_model_dir, gpu_nodes, all_reduce):
    """Members' partials leave the device before they are summed or sent; the group's output
    equals the whole blocks'."""
    handlers = [gpu_handler(tiny_model_dir, heads=h, name=f"m{k}") for k, h in enumerate([(0, 2), (2, 4)])]
    for handler in handlers:
        handler.can_relay = lambda contact: all_reduce
    reference = load_blocks(tiny_model_dir, 0, 4)
    x = torch.randn(1, 10, 64, generator=torch.Generator().manual_seed(7))
    with in_process_swarm(handlers, timeout=4.0) as (conns, swarm):
        session = InferenceSession.open(swarm, 12)
        cache = reference.new_cache(12)
        worst = 0.0
        for a, b in ((0, 5), *((t, t + 1) for t in range(5, 10))):
            got = session.step(x[:, a:b])
            with torch.inference_mode():
                want = reference(x[:, a:b], [cache])
            worst = max(worst, (got - want).abs().max().item())
        assert session.stages[0].all_reduce is all_reduce and session.failovers == 0
        session.close()
    assert worst < 1e-5
    assert all(h.steps.device_failure is None for h in handlers)


def test_a_gpu_head_gives_cpu_logits_and_says_when_tf32_came_on(tiny_model_dir, caplog):
    """The client's head on a GPU: the hidden state goes to it, float32 logits come back to the CPU
    for the sampler, equal to a CPU head's. TF32 turned on later in the process (an application's
    `torch.set_float32_matmul_precision("high")`) is warned of once (review172); the head does not
    turn it off, the process's owner chose it. Set here through torch's new API, as `exact_float32`
    sets it (which `set_float32_matmul_precision("high")` also sets, and the old API cannot be
    read after it), and put back after: the setting is the whole worker process's (review175), and
    a oneDNN that honours it would change later tests' float32 results. Also: `tf32_on` reads the
    new API only, where a read of the old one raises once the new one has been set."""
    embeddings, cpu_head = load_embeddings(tiny_model_dir), load_head(tiny_model_dir)
    hidden = torch.randn(1, 3, 64, generator=torch.Generator().manual_seed(9))
    matmul = torch.backends.cuda.matmul
    before = matmul.fp32_precision
    exact_float32()  # as resolve_device("cuda") does
    try:
        with FakeCuda():
            model = ClientModel(embeddings, to_gpu(load_head(tiny_model_dir)))
            assert model.device.type == "cuda"
            logits = model.logits(hidden)
            assert not on_gpu(logits) and logits.dtype == torch.float32 and logits.shape == (50257,)
            with torch.inference_mode():
                assert torch.allclose(logits, cpu_head(hidden[:, -1:])[0, -1], atol=1e-6)
            assert "TF32" not in caplog.text
            assert not tf32_on()
            matmul.fp32_precision = "tf32"  # the application turns it on
            with caplog.at_level(logging.WARNING, logger="nanoswarm.client.generate"):
                model.logits(hidden)
                model.logits_rows(hidden[:, -1:].expand(2, 1, 64))
        assert caplog.text.count("TF32 is on") == 1
        assert tf32_on() and matmul.fp32_precision == "tf32"  # left as its owner set it
    finally:
        matmul.fp32_precision = before

