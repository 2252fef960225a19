"""Sharded GroupNorm (process_group=) against single-process GroupNorm on the whole tensor.

Each world size spawns its ranks once (gloo on loopback, file rendezvous in tmp_path) and
runs every case in them; ranks write their results to files that the test compares with
``groupnorm.group_norm`` on the concatenated tensor: each rank's output and dx equal the
matching slice, and dweight/dbias/dscale/dshift summed over ranks equal the whole.
"""
from __future__ import annotations

import datetime
import os
import sys
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

import groupnorm
from groupnorm.backends import registry

TIMEOUT_S = 120  # per spawn (joins) and per collective (init_process_group)
WORLDS = (2, 3, 4)
REL = 1e-6  # of each tensor's largest magnitude: float32 differences in summation order


def assert_close(actual, expected):
    """Within REL of the tensor's scale (absolute floor REL), element by element."""
    atol = REL * max(1.0, expected.abs().max().item()) if expected.numel() else REL
    torch.testing.assert_close(actual, expected, rtol=REL, atol=atol)


def assert_param_grads_close(actual, single, truth, tensors, kwargs):
    """Parameter gradients against the float64 truth, for float32's limits.

    dweight = sum over N * HW of dz * xhat: a one-ulp difference in the float32 group mean
    (ours is merged from the ranks' parts, single-process's is computed whole) moves it by
    up to ulp(mean) * rstd * |sum dz|, more than 1e-6 of its size when dz has a mean. So
    the sum over ranks may differ from the truth by the single-process error, plus that
    one-ulp sensitivity (measured in float64 with a shifted mean), plus REL of the scale.
    (For a float64 input the ulp is float64's, so the bound is tight there too.)
    """
    t64 = {k: v.double() for k, v in tensors.items()}
    exact = groupnorm.group_stats(t64["x"], kwargs["num_groups"])
    ulp = torch.finfo(tensors["x"].dtype).eps * exact.mean.abs()
    shifted = groupnorm.GroupStats(exact.count, exact.mean + ulp, exact.m2)
    _, base = _forward_backward(t64, kwargs, stats=exact)
    _, moved = _forward_backward(t64, kwargs, stats=shifted)
    for name in actual:
        err = (actual[name].double() - truth[name]).abs().max().item()
        ref_err = (single[name].double() - truth[name]).abs().max().item()
        sensitivity = (moved[name] - base[name]).abs().max().item()
        bound = ref_err + sensitivity + REL * max(1.0, truth[name].abs().max().item())
        assert err <= bound, (name, err, ref_err, sensitivity)


# world size -> shard sizes of the cases split along H, W and D (uneven, some empty)
SPLITS = {
    2: {"h": [37, 27], "w": [5, 14], "d": [3, 4]},
    3: {"h": [37, 64, 27], "w": [9, 0, 10], "d": [1, 4, 2]},
    4: {"h": [37, 64, 27, 13], "w": [2, 7, 3, 7], "d": [2, 0, 3, 2]},
}


def _cases(world: int):
    # Fresh random inputs with a non-zero mean; every case is (name, tensors, split dim, sizes, kwargs).
    g = torch.Generator().manual_seed(1234 + world)
    sizes = SPLITS[world]

    def rand(*shape, dtype=torch.float32):
        return (-2.3 + 0.7 * torch.randn(*shape, generator=g, dtype=torch.float64)).to(dtype)

    def params(c, dtype=torch.float32):
        return 1.0 + 0.3 * rand(c, dtype=torch.float64).to(dtype), rand(c, dtype=dtype)

    cases = []
    h = sum(sizes["h"])
    w, b = params(8)
    cases.append(("h_uneven", dict(x=rand(2, 8, h, 6), weight=w, bias=b), 2, sizes["h"], dict(num_groups=4)))
    wsum = sum(sizes["w"])
    w, b = params(12)
    cases.append(("w_fused", dict(x=rand(2, 12, 5, wsum), weight=w, bias=b, scale=0.2 * rand(2, 12),
                                  shift=rand(2, 12)), 3, sizes["w"], dict(num_groups=3, activation="silu")))
    d = sum(sizes["d"])
    x5 = rand(3, 4, d, 3, 4).contiguous(memory_format=torch.channels_last_3d)
    cases.append(("d_5d_noaffine", dict(x=x5), 2, sizes["d"], dict(num_groups=2)))
    w, b = params(8, torch.float64)
    cases.append(("h_float64", dict(x=rand(1, 8, h, 3, dtype=torch.float64), weight=w, bias=b), 2, sizes["h"],
                  dict(num_groups=8, eps=1e-3)))
    w, b = params(64)
    # N * G = 96 > shard_exchange.INLINE_GROUPS: the statistics need the second all-reduce.
    cases.append(("h_many_groups", dict(x=rand(3, 64, h, 2), weight=w, bias=b), 2, sizes["h"],
                  dict(num_groups=32)))
    for name, t, *_ in cases:
        t["dy"] = rand(*t["x"].shape, dtype=t["x"].dtype)
    return cases


def _forward_backward(tensors, kwargs, **extra):
    """(y, grads by name) of group_norm with a weighted-sum loss."""
    leaves = {k: v.detach().clone().requires_grad_() for k, v in tensors.items() if k != "dy"}
    x = leaves.pop("x")
    y = groupnorm.group_norm(x, kwargs["num_groups"], leaves.get("weight"), leaves.get("bias"),
                             kwargs.get("eps", 1e-5), activation=kwargs.get("activation"),
                             scale=leaves.get("scale"), shift=leaves.get("shift"), **extra)
    (y * tensors["dy"]).sum().backward()
    return y.detach(), {"x": x.grad, **{k: v.grad for k, v in leaves.items()}}


def _loopback() -> None:
    # Keep gloo on the loopback interface (Linux's name), whatever the hostname resolves to.
    if sys.platform.startswith("linux"):
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")


def _worker(rank: int, world: int, folder: str) -> None:
    torch.set_num_threads(1)
    _loopback()
    # The reference kernels: a JIT compile per spawned rank would dominate the run time, and
    # the sharded path reaches kernels only through the ops, whose backends are tested apart.
    os.environ["GROUPNORM_BACKEND_CPU"] = "reference"
    dist.init_process_group("gloo", init_method=f"file://{folder}/rendezvous", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=TIMEOUT_S))
    try:
        results = {}
        for size in WORLDS:
            # Smaller worlds run on subgroups of the first ranks (every rank must create each).
            group = dist.group.WORLD if size == world else dist.new_group(list(range(size)))
            if rank < size:
                results[size] = _run_cases(size, rank, group)
        torch.save(results, os.path.join(folder, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _run_cases(world: int, rank: int, group) -> dict:
    results = {}
    for name, tensors, dim, sizes, kwargs in _cases(world):
        local = {k: (v.split(sizes, dim=dim)[rank] if k in ("x", "dy") else v) for k, v in tensors.items()}
        results[name] = _forward_backward(local, kwargs, process_group=group)
    # The module argument, on the first case.
    _, tensors, dim, sizes, kwargs = _cases(world)[0]
    module = groupnorm.GroupNorm(kwargs["num_groups"], tensors["x"].shape[1], process_group=group)
    with torch.no_grad():
        module.weight.copy_(tensors["weight"])
        module.bias.copy_(tensors["bias"])
    results["module"] = module(tensors["x"].split(sizes, dim=dim)[rank]).detach()
    return results


def _spawn(world: int, folder, worker=None) -> list:
    """Run worker (default _worker) on `world` ranks; each rank's results, or a failure within TIMEOUT_S."""
    ctx = mp.start_processes(worker or _worker, args=(world, str(folder)), nprocs=world, join=False,
                             start_method="spawn")
    deadline = time.monotonic() + TIMEOUT_S
    try:
        while not ctx.join(timeout=max(deadline - time.monotonic(), 0.1)):
            if time.monotonic() >= deadline:
                pytest.fail(f"{world} ranks did not finish within {TIMEOUT_S} s")
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.kill()
    return [torch.load(os.path.join(folder, f"rank{r}.pt")) for r in range(world)]


@pytest.fixture(scope="module")
def all_results(tmp_path_factory):
    """One spawn of max(WORLDS) ranks serves every world size (importing torch per rank is
    the slow part on a small machine)."""
    return _spawn(max(WORLDS), tmp_path_factory.mktemp("ranks"))


@pytest.fixture(params=WORLDS, ids=lambda w: f"world{w}")
def world_results(request, all_results):
    world = request.param
    return world, [res[world] for res in all_results[:world]]


@pytest.mark.parametrize("case", ["h_uneven", "w_fused", "d_5d_noaffine", "h_float64", "h_many_groups"])
def test_sharded_matches_single_process(world_results, case):
    world, results = world_results
    name, tensors, dim, sizes, kwargs = next(c for c in _cases(world) if c[0] == case)
    with registry.use_backend("reference"):
        y_ref, grads_ref = _forward_backward(tensors, kwargs)
        _, grads_truth = _forward_backward({k: v.double() for k, v in tensors.items()}, kwargs)
    for rank, res in enumerate(results):
        y, grads = res[name]
        assert_close(y, y_ref.split(sizes, dim=dim)[rank])
        assert_close(grads["x"], grads_ref["x"].split(sizes, dim=dim)[rank])
    params = sorted(set(grads_ref) - {"x"})
    totals = {p: sum(res[name][1][p] for res in results) for p in params}
    if params:
        with registry.use_backend("reference"):
            assert_param_grads_close(totals, grads_ref, grads_truth, tensors, kwargs)


def test_sharded_module(world_results):
    world, results = world_results
    _, tensors, dim, sizes, kwargs = _cases(world)[0]
    y_ref = torch.nn.functional.group_norm(tensors["x"], kwargs["num_groups"], tensors["weight"], tensors["bias"])
    for rank, res in enumerate(results):
        assert_close(res["module"], y_ref.split(sizes, dim=dim)[rank])


def test_single_rank_in_process_default_backend(tmp_path):
    """A one-rank group in this process, on the default CPU kernels: sharded == unsharded."""
    _loopback()
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/rendezvous", rank=0, world_size=1,
                            timeout=datetime.timedelta(seconds=TIMEOUT_S))
    try:
        name, tensors, _, _, kwargs = _cases(2)[1]  # activation, scale and shift
        y, grads = _forward_backward(tensors, kwargs, process_group=dist.group.WORLD)
    finally:
        dist.destroy_process_group()
    y_ref, grads_ref = _forward_backward(tensors, kwargs)
    assert_close(y, y_ref)
    for key in grads_ref:
        assert_close(grads[key], grads_ref[key])


# --- ranks whose shards disagree --------------------------------------------------------
# Each case gives rank r its (input shape, dtype, num_groups). Ranks that disagree on N, C,
# num_groups or dtype must all raise a RuntimeError naming the disagreement (before, gloo
# ended one rank's process and the other read "connection reset", or the result was
# silently wrong); a rank whose input fails its own checks raises that error, the others a
# RuntimeError naming that rank. The group stays usable after each.

DISAGREEING = {
    "batch": lambda r: ((2 + r, 8, 5, 4), torch.float32, 4),
    "channels": lambda r: ((2, 8 * (1 + r), 5, 4), torch.float32, 4),
    "num_groups": lambda r: ((2, 8, 5, 4), torch.float32, 4 // (1 + r)),
    "dtype float64": lambda r: ((2, 8, 5, 4), (torch.float32, torch.float64)[r], 4),
    "dtype bfloat16": lambda r: ((2, 8, 5, 4), (torch.float32, torch.bfloat16)[r], 4),
    "batch, beyond the first all-reduce": lambda r: ((3 - r, 64, 3, 2), torch.float32, 32),
    "same N * G, other N and G": lambda r: ((2 * (1 + r), 8, 3, 2), torch.float32, 4 // (1 + r)),
}
FAILING_ON_RANK_1 = {
    "channels not divisible on rank 1": lambda r: ((2, 8 + 4 * r, 5, 4), torch.float32, 8),
    "integer input on rank 1": lambda r: ((2, 8, 5, 4), (torch.float32, torch.int64)[r], 4),
}


def _disagreeing_worker(rank: int, world: int, folder: str) -> None:
    torch.set_num_threads(1)
    _loopback()
    os.environ["GROUPNORM_BACKEND_CPU"] = "reference"
    dist.init_process_group("gloo", init_method=f"file://{folder}/rendezvous", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=TIMEOUT_S))
    try:
        results = {}
        g = torch.Generator().manual_seed(40 + rank)
        for name, case in {**DISAGREEING, **FAILING_ON_RANK_1}.items():
            shape, dtype, groups = case(rank)
            x = (1.5 + torch.randn(shape, generator=g, dtype=torch.float64)).to(dtype)
            try:
                groupnorm.group_norm(x, groups, process_group=dist.group.WORLD)
                results[name] = ("no error", "")
            except Exception as error:  # noqa: BLE001 - the test compares type and message
                results[name] = (type(error).__name__, str(error))
        # torch's "more than 1 value per channel" concerns the whole tensor, not a shard.
        x = torch.randn(1, 4, 1 - rank, 1, generator=g)   # one value per group in all
        try:
            groupnorm.group_norm(x, 4, process_group=dist.group.WORLD)
            results["one value in all"] = ("no error", "")
        except Exception as error:  # noqa: BLE001
            results["one value in all"] = (type(error).__name__, str(error))
        x = torch.randn(1, 4, 1 + rank, 1, generator=g)   # one value on rank 0's shard, three in all
        results["one value on a shard"] = (x, groupnorm.group_norm(x, 4, process_group=dist.group.WORLD))
        # Afterwards the group still works: an agreeing call, forward and backward.
        _, tensors, dim, sizes, kwargs = _cases(world)[0]
        local = {k: (v.split(sizes, dim=dim)[rank] if k in ("x", "dy") else v) for k, v in tensors.items()}
        results["after"] = _forward_backward(local, kwargs, process_group=dist.group.WORLD)
        torch.save(results, os.path.join(folder, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def disagreeing_results(tmp_path_factory):
    return _spawn(2, tmp_path_factory.mktemp("disagree"), _disagreeing_worker)


@pytest.mark.parametrize("case", list(DISAGREEING))
def test_disagreeing_shards_raise_on_every_rank(disagreeing_results, case):
    for rank, res in enumerate(disagreeing_results):
        kind, message = res[case]
        assert kind == "RuntimeError" and "disagree" in message, (rank, kind, message)
        for r in range(2):   # every rank's facts are named
            shape, dtype, groups = DISAGREEING[case](r)
            assert f"rank {r}: N={shape[0]}, C={shape[1]}, num_groups={groups}, dtype={dtype}" in message


@pytest.mark.parametrize("case", list(FAILING_ON_RANK_1))
def test_a_rank_failing_its_checks_stops_every_rank(disagreeing_results, case):
    (kind0, message0), (kind1, message1) = (res[case] for res in disagreeing_results)
    assert kind0 == "RuntimeError" and "rank(s) [1] failed" in message0, (kind0, message0)
    shape, dtype, groups = FAILING_ON_RANK_1[case](1)
    x1 = torch.zeros(shape, dtype=dtype)
    with pytest.raises(Exception) as single:   # rank 1 raises what a single process raises
        groupnorm.group_norm(x1, groups)
    assert (kind1, message1) == (type(single.value).__name__, str(single.value))


def test_group_still_works_after_the_errors(disagreeing_results):
    name, tensors, dim, sizes, kwargs = _cases(2)[0]
    with registry.use_backend("reference"):
        y_ref, grads_ref = _forward_backward(tensors, kwargs)
    for rank, res in enumerate(disagreeing_results):
        y, grads = res["after"]
        assert_close(y, y_ref.split(sizes, dim=dim)[rank])
        assert_close(grads["x"], grads_ref["x"].split(sizes, dim=dim)[rank])


def test_one_value_per_group_is_judged_on_the_whole_tensor(disagreeing_results):
    for res in disagreeing_results:
        kind, message = res["one value in all"]
        assert kind == "ValueError" and "more than 1 value" in message, (kind, message)
    shards = [res["one value on a shard"] for res in disagreeing_results]
    whole = F.group_norm(torch.cat([x for x, _ in shards], dim=2), 4)
    for (x, y), expected in zip(shards, whole.split([x.shape[2] for x, _ in shards], dim=2)):
        assert_close(y, expected)
