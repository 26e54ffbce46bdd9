"""GPU checks (run on a CUDA machine with `pytest -m gpu`): the PyTorch WKV path and the model on CUDA
against float64 references, and a bf16-autocast training step."""

import pytest
import torch

import zoo
from blocks.wkv import wkv4, wkv4_reference

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def rel_err(a, b):
    return ((a.double().cpu() - b.double().cpu()).abs().max() / b.double().cpu().abs().max()).item()


@pytest.mark.parametrize("B,T,C", [(1, 1, 1), (3, 257, 67), (2, 4096, 128)])
def test_wkv_on_cuda_matches_fp64_reference(B, T, C):
    g = torch.Generator().manual_seed(B * T * C)
    w = -torch.exp(torch.randn(C, generator=g) * 2)
    u = torch.randn(C, generator=g)
    k = torch.randn(B, T, C, generator=g) * 3
    v = torch.randn(B, T, C, generator=g)
    ref, _ = wkv4_reference(w, u, k, v)
    y, state = wkv4(*(x.cuda() for x in (w, u, k, v)))
    assert y.is_cuda and state[0].is_cuda
    assert rel_err(y, ref) < 1e-4


@pytest.mark.parametrize("name,extra", [("rwkv4-tiny", {}), ("rrwkv-tiny", {"dim_ffn": 192, "segment_len": 7}),
                                        ("rwkv5-tiny", {}), ("rwkv5-tiny", {"version": "5.1"}),
                                        ("rwkv5-tiny", {"version": "5.0"})])
def test_model_on_cuda_matches_cpu_fp64(name, extra):
    """RWKV-4, RRWKV with its medium WKV (u = -w over T / 7 mediums) on the same CUDA kernels, and RWKV-5 (5.2, and
    5.0 / 5.1 with their per-head decay and bonus broadcast over the head) on the matrix-state kernel."""
    torch.manual_seed(0)
    model = zoo.create_model(name, n_layer=2, n_embd=64, **extra).double().eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.2)
    idx = torch.randint(0, 256, (2, 300))
    with torch.no_grad():
        ref = model(idx)
        gpu = model.float().cuda()(idx.cuda())
        state = model.init_state(2)
        rnn = []
        for t in range(20):
            logits, state = model.forward_rnn(idx[:, t].cuda(), state)
            rnn.append(logits)
    assert rel_err(gpu, ref) < 1e-5
    assert rel_err(torch.stack(rnn, 1), ref[:, :20]) < 1e-5


@pytest.mark.parametrize("name", ["rwkv4-tiny", "rrwkv-tiny"])
def test_bf16_autocast_training_step(name):
    model = zoo.create_model(name).cuda()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    idx = torch.randint(0, 256, (4, 129), device="cuda")
    losses = []
    for _ in range(5):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            logits = model(idx[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), idx[:, 1:].flatten())
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0]


def test_vrwkv_on_cuda_matches_cpu_fp64_and_trains_under_bf16():
    """vrwkv_tiny through the Bi-WKV kernel against the float64 CPU model, and a bf16-autocast training step."""
    import timm

    torch.manual_seed(0)
    model = timm.create_model("vrwkv_tiny", num_classes=10, img_size=64, depth=2).double().eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    x = torch.randn(2, 3, 64, 80, dtype=torch.float64)
    with torch.no_grad():
        ref = model(x)
        gpu = model.float().cuda()(x.float().cuda())
    assert rel_err(gpu, ref) < 1e-4
    model.train()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = torch.nn.functional.cross_entropy(model(x.float().cuda()), torch.tensor([1, 2], device="cuda"))
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


@pytest.mark.parametrize("compile", [False, True], ids=["eager", "compiled"])
def test_selective_checkpointing_keeps_the_bi_wkv_output_and_less_memory(monkeypatch, compile):
    """vrwkv_tiny training at 512 px under bf16 autocast: selective checkpointing keeps the Bi-WKV kernel's outputs
    (the policy sees the zoo op), holds well under the plain backward's activations, and its gradients are as close
    to the fp32 ones as the plain bf16 backward's. (bf16 alone moves the spatial mixes' gradients by up to 4% of their
    largest element, in eager and compiled runs alike, so two bf16 runs are compared through the fp32 gradients.)"""
    import timm

    from blocks import checkpointing

    seen, policy = set(), checkpointing.keep_products_and_kernels

    def recording(ctx, op, *args, **kwargs):
        seen.add(getattr(op, "namespace", None))
        return policy(ctx, op, *args, **kwargs)

    monkeypatch.setattr(checkpointing, "keep_products_and_kernels", recording)
    torch.manual_seed(0)
    model = timm.create_model("vrwkv_tiny", img_size=512, drop_path_rate=0.0).cuda()
    forward = torch.compile(model) if compile else model
    x = torch.randn(4, 3, 512, 512, device="cuda")

    def step(run=forward, bf16=True):
        model.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        start = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=bf16):
            loss = run(x).float().logsumexp(-1).sum()
        loss.backward()
        peak = torch.cuda.max_memory_allocated() - start
        return peak, {n: p.grad.float() for n, p in model.named_parameters()}

    _, fp32 = step(model, bf16=False)
    step()   # compiles
    plain_peak, plain = step()
    model.set_grad_checkpointing("selective")
    step()
    peak, grads = step()
    assert "zoo" in seen
    assert peak < 0.6 * plain_peak, (peak, plain_peak)
    selective_err, plain_err = (max(rel_err(g[n], fp32[n]) for n in fp32) for g in (grads, plain))
    assert selective_err <= 1.5 * plain_err, (selective_err, plain_err)


@pytest.mark.parametrize("name,compile", [("rwkv4-tiny", False), ("rwkv4-tiny", True), ("rwkv7-tiny", False),
                                          ("gpt-tiny", False)])
def test_cuda_graph_decoding_matches_parallel_forward(name, compile):
    """zoo.decode's captured step (CUDA graph, optionally compiled) against one parallel forward, fp32."""
    from zoo.decode import RNNDecoder, make_decoder

    torch.manual_seed(0)
    model = zoo.create_model(name, n_layer=2).cuda().eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
        idx = torch.randint(0, 256, (2, 40), device="cuda")
        full = model(idx)
    decoder = make_decoder(model, 2, capacity=40) if name == "gpt-tiny" else \
        RNNDecoder(model, 2, compile=compile, graph_prefill=True)
    assert decoder.path.endswith("cuda-graph")
    decoder.prefill_chunk = 4                # chunks of 4, 4, 2 tokens: two prefill graphs, one replayed
    out = [decoder.prefill(idx[:, :10])] + [decoder.step(idx[:, t].cpu()).clone() for t in range(10, 39)]
    assert decoder.graph is not None
    assert rel_err(torch.stack(out, 1), full[:, 9:-1]) < 1e-5


@pytest.mark.parametrize("name,compile", [("rwkv4-tiny", False), ("rwkv4-tiny", True), ("gpt-tiny", False)])
def test_stream_in_cuda_graphs_generates_what_a_step_loop_generates(name, compile):
    """zoo.decode's stream (pick on the GPU, fed back there, ids copied out one step behind) against a loop over
    step that takes each id back on the host, both replaying the CUDA graph."""
    from zoo.decode import RNNDecoder, make_decoder

    torch.manual_seed(0)
    model = zoo.create_model(name, n_layer=2).cuda().eval()
    prompt = torch.randint(0, 256, (2, 9), device="cuda")
    decoders = [make_decoder(model, 2, capacity=40) if name == "gpt-tiny" else RNNDecoder(model, 2, compile=compile)
                for _ in range(2)]
    streamed = torch.stack(list(decoders[0].stream(decoders[0].prefill(prompt), 20)))
    logits, looped = decoders[1].prefill(prompt), []
    for _ in range(20):
        looped.append(logits.argmax(-1).cpu())
        logits = decoders[1].step(looped[-1])
    assert all(d.graph is not None for d in decoders)
    assert torch.equal(streamed, torch.stack(looped))


def test_rrwkv_decodes_eagerly_on_cuda():
    """RRWKV's steps read the state on the host, which a CUDA graph capture forbids: its decoder runs eagerly."""
    from zoo.decode import make_decoder

    torch.manual_seed(0)
    model = zoo.create_model("rrwkv-tiny", n_layer=2, segment_len=4).cuda().eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
        idx = torch.randint(0, 256, (1, 20), device="cuda")
        full = model(idx)
    decoder = make_decoder(model, 1)
    assert decoder.path == "eager"
    out = [decoder.prefill(idx[:, :7])] + [decoder.step(idx[:, t]).clone() for t in range(7, 19)]
    assert rel_err(torch.stack(out, 1), full[:, 6:-1]) < 1e-5


_COMPILED_FIRST = """
import torch, zoo
from blocks import wkv_cuda
graphs = []
model = zoo.create_model("rwkv4-tiny", n_layer=1).cuda()
compiled = torch.compile(model, fullgraph=True, backend=lambda gm, _: graphs.append(gm.code) or gm.forward)
compiled(torch.randint(0, 256, (1, 64), device="cuda"))
print(wkv_cuda._EXTENSIONS["wkv"].loaded, "wkv4_forward" in graphs[0])
"""


def test_a_model_compiled_first_in_a_process_traces_the_kernel():
    """In a fresh process, torch.compile before any eager call: the kernels get built at trace time and the graph
    calls them (not the PyTorch path, whose loop over chunks also compiles far more slowly)."""
    import subprocess
    import sys

    run = subprocess.run([sys.executable, "-c", _COMPILED_FIRST], capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.split() == ["True", "True"]


def test_bench_lm_runs_on_tiny_models(tmp_path):
    from eval.bench_lm import bench_lm

    result = bench_lm(str(tmp_path / "lm.json"), str(tmp_path / "lm.png"), sizes=("tiny",), package=False)
    assert {r["seq_len"] for r in result["train"]} == {1024, 4096, 16384}
    assert all(r["tokens_per_s"] > 0 for r in result["train"] + result["batched"])
    assert {r["context"] for r in result["decode"] if r["arch"] == "gpt"} == {1024, 4096, 16384, 65536}
    assert all(r["path"] == "cuda-graph" for r in result["decode"])
    assert [r["impl"] for r in result["rnn"]] == ["ours (eager)", "ours (cuda-graph)", "ours (compile+cuda-graph)"]
    assert all(r["rnn_vs_prefill_max_abs"] < 0.05 and r["streamed_ms_per_token"] > 0 for r in result["rnn"])
    assert (tmp_path / "lm.png").stat().st_size > 0
