"""``lora_delta``: forward and every gradient against the float64 reference, on both CPU paths
(Triton kernels under the interpreter, and the grouped torch path) and, with ``-m gpu``, on CUDA."""

import pytest
import torch
from conftest import capture_cuda_graph, cpu_backends, run_on
from tolerances import assert_close

from bora_kernels.ops import LoRAPlan, lora_delta, lora_plan
from bora_kernels.ops._dispatch import triton_interpreted
from bora_kernels.ops.lora_delta.reference import lora_delta_reference

K, N = 40, 36  # not multiples of any block size
SEQUENCE_SPLITS = {1: (1, 1), 7: (1, 7), 63: (7, 9), 130: (10, 13)}  # T -> (B, L)


def make_case(num_tokens, num_adapters, mode, ranks, dtype, device="cpu", k=K, n=N, seed=0):
    """Random inputs; padded rank zeroed; ids include -1 whenever the batch has room for it."""
    g = torch.Generator().manual_seed(seed)
    if ranks == "equal":
        rank_list = [8] * num_adapters
    else:  # mixed: the largest is present, the others smaller, some tiny
        rank_list = [12] + torch.randint(1, 12, (num_adapters - 1,), generator=g).tolist()
    max_rank = max(rank_list)
    ranks_t = torch.tensor(rank_list)
    keep = torch.arange(max_rank)[None, :] < ranks_t[:, None]
    a = torch.randn(num_adapters, max_rank, k, generator=g) * keep[:, :, None]
    b = torch.randn(num_adapters, n, max_rank, generator=g) * keep[:, None, :]
    scaling = torch.rand(num_adapters, generator=g) + 0.5

    batches, length = SEQUENCE_SPLITS.get(num_tokens, (num_tokens, 1))
    if mode == "per_token":
        x = torch.randn(num_tokens, k, generator=g)
        ids = torch.randint(-1, num_adapters, (num_tokens,), generator=g)
    elif mode == "per_token_3d":
        x = torch.randn(batches, length, k, generator=g)
        ids = torch.randint(-1, num_adapters, (batches, length), generator=g)
    else:
        x = torch.randn(batches, length, k, generator=g)
        ids = torch.randint(-1, num_adapters, (batches,), generator=g)
    flat = ids.reshape(-1)
    if flat.numel() > 1:
        flat[0] = -1
        flat[-1] = num_adapters - 1
    cast = dict(device=device, dtype=dtype)
    return x.to(**cast), a.to(**cast), b.to(**cast), ids.to(device), scaling.to(device), ranks_t.to(device)


def per_token_ids(x, ids):
    if x.dim() == 3 and ids.dim() == 1:
        return ids[:, None].expand(x.shape[:-1])
    return ids


def check_against_reference(x, a, b, ids, scaling, ranks, dtype):
    leaves = [t.clone().requires_grad_() for t in (x, a, b)]
    out = lora_delta(*leaves, ids, scaling, ranks)
    dy = torch.randn_like(out)
    grads = torch.autograd.grad(out, leaves, dy)

    ref_leaves = [t.detach().double().requires_grad_() for t in (x, a, b)]
    ref = lora_delta_reference(*ref_leaves, ids, scaling, ranks)
    ref_grads = torch.autograd.grad(ref, ref_leaves, dy.double())

    assert out.dtype == x.dtype and out.shape == ref.shape
    assert_close(out, ref, dtype, "output")
    assert_close(grads[0], ref_grads[0], dtype, "dx")
    unused = per_token_ids(x, ids) == -1
    assert (out[unused] == 0).all(), "rows with id -1 must be exactly zero"
    assert (grads[0][unused] == 0).all(), "dx rows with id -1 must be exactly zero"
    for d in range(a.shape[0]):  # per adapter: a wrong small adapter cannot hide behind a big one
        assert_close(grads[1][d], ref_grads[1][d], dtype, f"dA[{d}]")
        assert_close(grads[2][d], ref_grads[2][d], dtype, f"dB[{d}]")
        r = int(ranks[d])
        assert (grads[1][d, r:] == 0).all() and (grads[2][d, :, r:] == 0).all(), "padded rank grad"


CASES = [
    pytest.param(t, d, mode, ranks, id=f"T{t}-D{d}-{mode}-{ranks}")
    for t in (1, 7, 63, 130)
    for d in (1, 3, 8)
    for mode in ("per_token", "per_token_3d", "per_sequence")
    for ranks in ("equal", "mixed")
]


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("num_tokens,num_adapters,mode,ranks", CASES)
def test_matches_reference_cpu(poison_empty, backend, dtype, num_tokens, num_adapters, mode, ranks):
    case = make_case(num_tokens, num_adapters, mode, ranks, dtype)
    with run_on(backend):
        check_against_reference(*case, dtype)


@pytest.mark.parametrize("backend", cpu_backends())
def test_bf16_inputs_cpu(poison_empty, backend):
    """bf16 goes through the kernels widened to fp32 under the interpreter (its bf16 dot is wrong)."""
    case = make_case(63, 3, "per_token", "mixed", torch.bfloat16)
    with run_on(backend):
        check_against_reference(*case, torch.bfloat16)


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("fill", [-1, 0], ids=["all_none", "all_adapter0"])
def test_uniform_ids(poison_empty, backend, fill):
    x, a, b, ids, scaling, ranks = make_case(63, 3, "per_token", "equal", torch.float32)
    ids = torch.full_like(ids, fill)
    with run_on(backend):
        check_against_reference(x, a, b, ids, scaling, ranks, torch.float32)


@pytest.mark.parametrize("backend", cpu_backends())
def test_defaults_scaling_and_ranks(poison_empty, backend):
    x, a, b, ids, _, _ = make_case(63, 3, "per_token", "equal", torch.float32)
    with run_on(backend):
        out = lora_delta(x, a, b, ids)
    assert_close(out, lora_delta_reference(x, a, b, ids), torch.float32, "output")


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("layout", ["contiguous", "strided"])
@pytest.mark.parametrize("mode", ["per_token", "per_sequence"])
def test_add_to_adds_in_place(poison_empty, backend, layout, mode):
    """``add_to`` (a base layer's output, itself in an autograd graph) gets the delta added in place:
    the result and every gradient, the base's own included, match the reference; a strided
    ``add_to`` takes a separate add and gives the same."""
    x, a, b, ids, scaling, ranks = make_case(63, 3, mode, "mixed", torch.float32)
    w = torch.randn(N, K, generator=torch.Generator().manual_seed(4))
    leaves = [t.clone().requires_grad_() for t in (x, a, b, w)]
    ref_leaves = [t.detach().double().requires_grad_() for t in (x, a, b, w)]
    bias = torch.randn(N, generator=torch.Generator().manual_seed(5))
    with run_on(backend):
        base = torch.nn.functional.linear(leaves[0], leaves[3], bias)  # a 3-D input makes it a view
        if layout == "strided":
            base = (leaves[3] @ leaves[0].transpose(-1, -2)).transpose(-1, -2) + bias
        out = lora_delta(*leaves[:3], ids, scaling, ranks, add_to=base)
        assert out.data_ptr() == base.data_ptr() and out.shape == base.shape
        dy = torch.randn_like(out)
        grads = torch.autograd.grad(out, leaves, dy)
    ref = ref_leaves[0] @ ref_leaves[3].T + bias.double() + lora_delta_reference(*ref_leaves[:3], ids, scaling, ranks)
    ref_grads = torch.autograd.grad(ref, ref_leaves, dy.double())
    assert_close(out, ref, torch.float32, "output")
    for g, r, name in zip(grads, ref_grads, ("dx", "dA", "dB", "dW (the base)")):
        assert_close(g, r, torch.float32, name)
    with run_on(backend), torch.no_grad():  # no autograd: the kernels add straight in
        base = torch.nn.functional.linear(x, w, bias)
        assert lora_delta(x, a, b, ids, scaling, ranks, add_to=base).data_ptr() == base.data_ptr()
    assert_close(base, ref.detach(), torch.float32, "output without grad")


@pytest.mark.parametrize("backend", cpu_backends())
def test_ranks_skip_padding(backend):
    """Whatever the padded part of the weights holds, a rank of r reads only the first r."""
    x, a, b, ids, scaling, ranks = make_case(63, 3, "per_token", "mixed", torch.float32)
    a_junk, b_junk = a + 100.0, b + 100.0
    for d, r in enumerate(ranks.tolist()):
        a_junk[d, :r], b_junk[d, :, :r] = a[d, :r], b[d, :, :r]
    with run_on(backend):
        got = lora_delta(x, a_junk, b_junk, ids, scaling, ranks)
    assert_close(got, lora_delta_reference(x, a, b, ids, scaling, ranks), torch.float32, "output")


@pytest.mark.parametrize("backend", cpu_backends())
def test_plan_is_reusable(backend):
    x, a, b, ids, scaling, ranks = make_case(130, 8, "per_sequence", "mixed", torch.float32)
    plan = lora_plan(ids, x.shape[:-1], 8)
    assert isinstance(plan, LoRAPlan)
    with run_on(backend):
        with_plan = lora_delta(x, a, b, plan, scaling, ranks)
        with_ids = lora_delta(x, a, b, ids, scaling, ranks)
    assert torch.equal(with_plan, with_ids)


def test_plan_groups_tokens():
    ids = torch.tensor([2, -1, 0, 2, 1, 0])
    plan = lora_plan(ids, (6,), 3)
    assert plan.perm.tolist() == [1, 2, 5, 4, 0, 3]  # stable: equal ids keep their order
    assert plan.bounds.tolist() == [0, 0, 1, 3, 4, 6, 6]
    seq = lora_plan(torch.tensor([1, -1]), (2, 3), 2)
    assert seq.perm.tolist() == [3, 4, 5, 0, 1, 2]
    assert seq.bounds.tolist() == [0, 0, 3, 3, 6, 6]


@pytest.mark.skipif(not triton_interpreted(), reason="needs the Triton interpreter")
@pytest.mark.parametrize("split", [2, 4])
def test_split_work(poison_empty, split):
    """Cutting the output columns into shares (each recomputes h) changes no bit of out or h, and
    splitting the tokens of the weight gradients changes nothing beyond rounding."""
    from bora_kernels.ops.lora_delta import triton as kernels

    x, a, b, ids, scaling, ranks = make_case(130, 3, "per_token", "mixed", torch.float32, k=200, n=100)
    plan = lora_plan(ids, x.shape[:-1], 3)
    tiles = kernels._tiles(130, 3, a.shape[1], x.device)
    args = (plan, ranks.int(), scaling)
    results = []
    for s in (1, split):
        out, h = torch.empty(130, b.shape[1]), torch.empty(130, tiles["BLOCK_R"])
        kernels.lora_shrink_expand(x, a, b, out, *args, tiles, scale_h=False, h=h, split=s)
        results.append((out, h))
    (out1, h1), (outs, hs) = results
    used = slice(int(plan.bounds[2]), int(plan.bounds[-2]))  # h rows of tokens with an adapter
    assert torch.equal(outs, out1) and torch.equal(hs[used], h1[used])
    dy = torch.randn(130, b.shape[1], generator=torch.Generator().manual_seed(1))
    row_weight = torch.rand(130, generator=torch.Generator().manual_seed(2))
    grads = []
    for s in (1, split):  # dA and dB (scaled, row-weighted) in one launch
        da, db = torch.empty_like(a), torch.empty_like(b)
        jobs = [kernels.GradJob(h1, x, da, weighted=False), kernels.GradJob(h1, dy, db.transpose(1, 2), weighted=True)]
        kernels.lora_weight_grads(jobs, *args, tiles, row_weight=row_weight, split=s)
        grads.append((da, db))
    (da1, db1), (das, dbs) = grads
    torch.testing.assert_close(das, da1, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dbs, db1, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", cpu_backends())
def test_deterministic(backend):
    x, a, b, ids, scaling, ranks = make_case(130, 3, "per_token", "mixed", torch.float16)
    with run_on(backend):
        runs = []
        for _ in range(2):
            leaves = [t.clone().requires_grad_() for t in (x, a, b)]
            out = lora_delta(*leaves, ids, scaling, ranks)
            runs.append([out, *torch.autograd.grad(out, leaves, torch.ones_like(out))])
    for first, second in zip(*runs):
        assert torch.equal(first, second)


@pytest.mark.parametrize("backend", cpu_backends())
def test_custom_op_backward_recomputes_h(poison_empty, backend):
    """The torch.compile path saves no h: its backward op recomputes it, on every CPU path."""
    from bora_kernels.ops.lora_delta import _lora_delta_backward_op

    x, a, b, ids, scaling, ranks = make_case(63, 3, "per_token", "mixed", torch.float32)
    plan = lora_plan(ids, x.shape[:-1], 3)
    dy = torch.randn(63, b.shape[1], generator=torch.Generator().manual_seed(3))
    ref_leaves = [t.detach().double().requires_grad_() for t in (x, a, b)]
    ref_grads = torch.autograd.grad(lora_delta_reference(*ref_leaves, ids, scaling, ranks), ref_leaves, dy.double())
    with run_on(backend):
        for needs in ((True, True, True), (False, False, True)):
            grads = _lora_delta_backward_op(dy, x, a, b, plan.perm, plan.bounds, scaling.float(),
                                            ranks.int(), *needs)
            for got, ref, need, what in zip(grads, ref_grads, needs, ("dx", "dA", "dB")):
                if need:
                    assert_close(got, ref, torch.float32, what)
                else:
                    assert got.numel() == 0


def test_torch_path_work_buffers_outlive_inference_mode_and_are_per_thread():
    """The torch path keeps its work buffers between calls (``grouped._work``): one first made
    under ``torch.inference_mode`` serves a later call under autograd, and threads running the
    op at once each use their own (every thread's outputs equal the reference)."""
    import threading

    from bora_kernels.ops import use_backend

    case = make_case(130, 4, "per_sequence", "mixed", torch.float32)
    with run_on("torch-padded"):
        with torch.inference_mode():
            lora_delta(*case[:3], case[3], *case[4:])
        check_against_reference(*case, torch.float32)
    results, errors = {}, []

    def run(seed):
        try:
            x, a, b, ids, scaling, ranks = make_case(130, 8, "per_token", "mixed", torch.float32, seed=seed)
            with use_backend("torch"), torch.no_grad():
                results[seed] = (lora_delta_reference(x, a, b, ids, scaling, ranks),
                                 [lora_delta(x, a, b, ids, scaling, ranks) for _ in range(30)])
        except Exception as err:  # (re-raised in the main thread below)
            errors.append(err)

    threads = [threading.Thread(target=run, args=(seed,)) for seed in (1, 2, 3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors
    for seed, (want, outs) in results.items():
        for out in outs:
            assert_close(out, want, torch.float32, f"thread {seed}")


def test_no_grad_needed_skips_autograd():
    x, a, b, ids, scaling, ranks = make_case(7, 3, "per_token", "equal", torch.float32)
    out = lora_delta(x, a, b, ids, scaling, ranks)
    assert out.grad_fn is None
    assert_close(out, lora_delta_reference(x, a, b, ids, scaling, ranks), torch.float32, "output")


def test_empty_batch():
    x = torch.randn(0, K, requires_grad=True)
    a, b = torch.randn(2, 4, K), torch.randn(2, N, 4)
    out = lora_delta(x, a, b, torch.zeros(0, dtype=torch.long))
    assert out.shape == (0, N)
    out.sum().backward()
    assert x.grad.shape == (0, K)


# --- bad input: a ValueError that names the argument ----------------------------------------

def _good():
    return make_case(7, 3, "per_token", "equal", torch.float32)


BAD_INPUTS = [
    (lambda c: {**c, "x": c["x"][0]}, "x must be"),
    (lambda c: {**c, "x": c["x"].tolist()}, "x must be"),
    (lambda c: {**c, "lora_a": None}, "lora_a must be"),
    (lambda c: {**c, "x": c["x"].reshape(1, 1, 7, K)}, "x must be"),
    (lambda c: {**c, "x": c["x"].double()}, "x must be float16"),
    (lambda c: {**c, "x": c["x"].long()}, "x must be float16"),
    (lambda c: {**c, "lora_a": c["lora_a"][0]}, "lora_a must be"),
    (lambda c: {**c, "lora_a": c["lora_a"][..., :-1]}, "lora_a must be"),
    (lambda c: {**c, "lora_b": c["lora_b"][:2]}, "lora_b must be"),
    (lambda c: {**c, "lora_b": c["lora_b"][..., :-1]}, "lora_b must be"),
    (lambda c: {**c, "lora_a": c["lora_a"].half()}, "lora_a has dtype"),
    (lambda c: {**c, "lora_b": c["lora_b"].to("meta")}, "lora_b is on"),
    (lambda c: {**c, "adapter_ids": c["adapter_ids"].float()}, "adapter_ids must be an integer"),
    (lambda c: {**c, "adapter_ids": c["adapter_ids"].bool()}, "adapter_ids must be an integer"),
    (lambda c: {**c, "adapter_ids": [0] * 7}, "adapter_ids must be an integer"),
    (lambda c: {**c, "adapter_ids": c["adapter_ids"][:3]}, "adapter_ids has shape"),
    (lambda c: {**c, "adapter_ids": torch.full((7,), 3)}, r"adapter_ids must lie in \[-1, 3\)"),
    (lambda c: {**c, "adapter_ids": torch.full((7,), -2)}, r"adapter_ids must lie in \[-1, 3\)"),
    (lambda c: {**c, "scaling": torch.ones(2)}, "scaling must be"),
    (lambda c: {**c, "scaling": torch.ones(3, dtype=torch.long)}, "scaling must be"),
    (lambda c: {**c, "ranks": torch.ones(2, dtype=torch.long)}, "ranks must be"),
    (lambda c: {**c, "ranks": torch.ones(3)}, "ranks must be"),
    (lambda c: {**c, "ranks": torch.tensor([1, 2, 9])}, r"ranks must lie in \[0, 8\]"),
    (lambda c: {**c, "adapter_ids": lora_plan(c["adapter_ids"], (7,), 4)}, "plan for batch"),
    (lambda c: {**c, "add_to": torch.zeros(7, 5)}, r"add_to must be a float tensor of shape \(7, 36\)"),
    (lambda c: {**c, "add_to": torch.zeros(7, 36, dtype=torch.long)}, "add_to must be a float"),
    (lambda c: {**c, "add_to": torch.zeros(7, 36, device="meta")}, "add_to is on"),
]


@pytest.mark.parametrize("change,match", BAD_INPUTS, ids=[f"{i}-{m.split()[0]}" for i, (_, m) in enumerate(BAD_INPUTS)])
def test_bad_input_raises(change, match):
    x, a, b, ids, scaling, ranks = _good()
    good = dict(x=x, lora_a=a, lora_b=b, adapter_ids=ids, scaling=scaling, ranks=ranks)
    with pytest.raises(ValueError, match=match):
        lora_delta(**change(good))


def test_per_sequence_ids_need_3d_x():
    x, a, b, _, _, _ = make_case(7, 3, "per_token", "equal", torch.float32)
    with pytest.raises(ValueError, match="adapter_ids has shape"):
        lora_delta(x.reshape(1, 7, K), a, b, torch.zeros(7, dtype=torch.long)[:2])


# --- GPU: bf16, larger shapes, graphs, determinism (run with `pytest -m gpu`) ------------------

GPU_DTYPES = [pytest.param(d, id=str(d).split(".")[1]) for d in (torch.float32, torch.float16, torch.bfloat16)]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", GPU_DTYPES)
@pytest.mark.parametrize("num_tokens,num_adapters,mode,ranks", CASES)
def test_matches_reference_gpu(poison_empty, dtype, num_tokens, num_adapters, mode, ranks):
    check_against_reference(*make_case(num_tokens, num_adapters, mode, ranks, dtype, "cuda"), dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", GPU_DTYPES)
@pytest.mark.parametrize("shape", [(4096, 32, 512, 512), (1000, 5, 1000, 300), (64, 64, 4096, 4096)],
                         ids=["T4096-D32", "T1000-D5-odd", "T64-D64-wide"])
def test_large_shapes_gpu(poison_empty, dtype, shape):
    t, d, k, n = shape
    case = make_case(t, d, "per_token", "mixed", dtype, "cuda", k=k, n=n)
    check_against_reference(*case, dtype)


@pytest.mark.gpu
def test_deterministic_gpu():
    x, a, b, ids, scaling, ranks = make_case(130, 8, "per_token", "mixed", torch.bfloat16, "cuda",
                                             k=1024, n=1024)
    runs = []
    for _ in range(3):
        leaves = [t.clone().requires_grad_() for t in (x, a, b)]
        out = lora_delta(*leaves, ids, scaling, ranks)
        runs.append([out, *torch.autograd.grad(out, leaves, torch.ones_like(out))])
    for other in runs[1:]:
        for first, second in zip(runs[0], other):
            assert torch.equal(first, second)


@pytest.mark.gpu
def test_cuda_graph_decode():
    """A decode step (one token per sequence) is captured with its ids; replays follow new ids."""
    x, a, b, ids, scaling, ranks = make_case(63, 8, "per_token", "mixed", torch.bfloat16, "cuda",
                                             k=512, n=512)
    static_ids = ids.clone()
    graph, out = capture_cuda_graph(lambda: lora_delta(x, a, b, static_ids, scaling, ranks))
    for seed in range(3):
        new_ids = torch.randint(-1, 8, ids.shape, generator=torch.Generator().manual_seed(seed))
        static_ids.copy_(new_ids)
        graph.replay()
        torch.cuda.synchronize()
        assert_close(out, lora_delta_reference(x, a, b, new_ids.cuda(), scaling, ranks), torch.bfloat16, "replay")


@pytest.mark.gpu
def test_unchecked_cuda_ids_poison_rows():
    """Ids on the GPU are not checked (a host sync); an id out of range gives NaN, never a value."""
    x, a, b, ids, scaling, ranks = make_case(7, 3, "per_token", "equal", torch.float16, "cuda")
    bad = ids.clone()
    bad[2], bad[4] = 3, -5
    out = lora_delta(x, a, b, bad, scaling, ranks)
    assert out[2].isnan().all() and out[4].isnan().all()
    good = torch.ones(7, dtype=torch.bool)
    good[[2, 4]] = False
    assert torch.isfinite(out[good]).all()


@pytest.mark.gpu
def test_int64_offsets_gpu():
    """More than 2**31 elements in x: row offsets are int64 in every kernel."""
    t, k = 2**31 // 1024 + 64, 1024
    x = torch.randn(t, k, device="cuda", dtype=torch.float16)
    a = torch.randn(2, 16, k, device="cuda", dtype=torch.float16) / 32
    b = torch.randn(2, 16, 16, device="cuda", dtype=torch.float16) / 4
    ids = torch.zeros(t, dtype=torch.long, device="cuda")
    ids[-5:] = 1
    out = lora_delta(x, a, b, ids)
    tail = lora_delta_reference(x[-8:], a, b, ids[-8:])
    assert_close(out[-8:], tail, torch.float16, "last rows")
