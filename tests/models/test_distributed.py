"""Distributed training on CPU (SPEC.md "Distributed"): two gloo processes, DistributedDataParallel and
FSDP2 (`torch.distributed.fsdp.fully_shard`), each train a tiny vitkernels model and a tiny timm ViT
patched by `vitkernels.patch_timm` for one SGD step on half of a global batch. The gradients and the
updated parameters equal those of one process stepping on the whole batch.

All cases run in a single `torch.multiprocessing.spawn` of 2 processes (one process-group start for the
module); each test then checks one case against the 1-process step computed here."""

import os
import socket
from datetime import timedelta

import pytest
import torch
import torch.nn.functional as F

GLOBAL_BATCH, WORLD, LR = 4, 2, 0.5
MODELS = ("vitkernels_vit", "vitkernels_swin", "timm_vit_patched")
WRAPPERS = ("ddp", "fsdp2")
CASES = [(m, w) for m in MODELS for w in WRAPPERS]


def _has_timm():
    try:
        import timm  # noqa: F401
    except Exception:
        return False
    return True


def build(name):
    """The same initial weights in every process (seeded)."""
    import vitkernels
    from vitkernels.models import create_model

    torch.manual_seed(0)
    if name == "vitkernels_vit":
        return create_model(
            "vit_tiny_patch16_224", img_size=32, embed_dim=32, depth=2, num_heads=2, num_classes=5, drop_path_rate=0.0
        )
    if name == "vitkernels_swin":
        return create_model(
            "swin_tiny_patch4_window7_224",
            img_size=32,
            window_size=4,
            embed_dim=16,
            depths=(2, 2),
            num_heads=(1, 2),
            num_classes=5,
            drop_path_rate=0.0,
        )
    import timm

    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, depth=2, num_classes=5)
    vitkernels.patch_timm(model)
    assert type(model.blocks[0].attn).__name__.startswith("Fused"), "patch_timm did not fuse the attention"
    return model


def batch():
    g = torch.Generator().manual_seed(1)
    return torch.randn(GLOBAL_BATCH, 3, 32, 32, generator=g), torch.randint(0, 5, (GLOBAL_BATCH,), generator=g)


def step(model, params_of, x, y):
    """One SGD step; returns (loss, grads, params after the step) as full tensors keyed by name."""
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    loss = F.cross_entropy(model(x), y)
    loss.backward()
    grads = {n: _full(p.grad) for n, p in params_of(model)}
    opt.step()
    return loss.detach(), grads, {n: _full(p.detach()) for n, p in params_of(model)}


def _full(t):
    return (t.full_tensor() if hasattr(t, "full_tensor") else t).detach().clone()


def _worker(rank, port, out_dir, cases):
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    os.environ.setdefault("TRITON_INTERPRET", "1")
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD, timeout=timedelta(seconds=120)
    )
    try:
        torch.set_num_threads(1)
        x, y = batch()
        per = GLOBAL_BATCH // WORLD
        x, y = x[rank * per : (rank + 1) * per], y[rank * per : (rank + 1) * per]
        for name, wrapper in cases:
            model = build(name)
            if wrapper == "ddp":
                wrapped = DDP(model)
                result = step(wrapped, lambda m: m.module.named_parameters(), x, y)
            else:
                from torch.distributed.device_mesh import init_device_mesh
                from torch.distributed.fsdp import fully_shard

                mesh = init_device_mesh("cpu", (WORLD,))
                blocks = model.layers if hasattr(model, "layers") else model.blocks
                for block in blocks:  # shard per block, then the rest (the usual FSDP2 recipe)
                    fully_shard(block, mesh=mesh)
                fully_shard(model, mesh=mesh)
                result = step(model, lambda m: m.named_parameters(), x, y)
            torch.save(result, os.path.join(out_dir, f"{name}-{wrapper}-rank{rank}.pt"))
            dist.barrier()
    finally:
        dist.destroy_process_group()


def _free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def distributed_results(tmp_path_factory):
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with the gloo backend is not available in this torch build")
    try:
        from torch.distributed.fsdp import fully_shard  # noqa: F401
    except ImportError:
        pytest.skip("FSDP2 (torch.distributed.fsdp.fully_shard) is not available in this torch version")
    try:
        port = _free_port()
    except OSError as e:
        pytest.skip(f"no free localhost TCP port for the process group: {e}")
    import torch.multiprocessing as mp

    out = tmp_path_factory.mktemp("dist")
    cases = [c for c in CASES if c[0] != "timm_vit_patched" or _has_timm()]
    try:
        mp.get_context("spawn")
    except ValueError as e:
        pytest.skip(f"multiprocessing start method 'spawn' unavailable: {e}")
    mp.spawn(_worker, args=(port, str(out), cases), nprocs=WORLD, join=True)
    return out


@pytest.mark.parametrize("name,wrapper", CASES)
def test_two_process_step_equals_one_process_step(distributed_results, name, wrapper):
    if name == "timm_vit_patched" and not _has_timm():
        pytest.skip("timm does not import")
    x, y = batch()
    model = build(name)
    loss, grads, params = step(model, lambda m: m.named_parameters(), x, y)
    results = [
        torch.load(distributed_results / f"{name}-{wrapper}-rank{r}.pt", weights_only=True) for r in range(WORLD)
    ]
    # the mean of the two local losses is the global loss
    torch.testing.assert_close((results[0][0] + results[1][0]) / 2, loss, atol=1e-6, rtol=1e-5)
    for rank, (_, g, p) in enumerate(results):
        assert set(g) == set(grads) and set(p) == set(params), rank
        for n in grads:
            torch.testing.assert_close(g[n], grads[n], atol=1e-6, rtol=1e-4, msg=lambda m, n=n: f"grad {n}: {m}")
            torch.testing.assert_close(p[n], params[n], atol=1e-6, rtol=1e-4, msg=lambda m, n=n: f"param {n}: {m}")
    initial = build(name).state_dict()
    assert sum(not torch.equal(params[n], initial[n]) for n in params) > len(params) // 2  # the step moved weights
