"""Data-parallel GR training with DistributedDataParallel or FSDP2.

Global ascent (default): the closure runs forward/backward on the DDP model, DDP all-reduces
both gradients, and the step is FD-GR on the global batch; every rank applies the same
update. Local ascent (``--local-ascent``, m-sharpness): each rank perturbs by the gradient
of its own batch, via ``gr_fused.distributed.local_ascent_step``. ``--fsdp2`` shards the
parameters with ``fully_shard`` instead: each rank steps its own shards, and the norms
(ε_t, clipping, the inf/NaN skip) are all-reduced over them. BatchNorm running statistics
are updated by the pass at θ only.

    torchrun --nproc_per_node 2 examples/train_ddp.py [--local-ascent | --fsdp2]
    python examples/train_ddp.py --spawn 2 [--local-ascent | --fsdp2]   # CPU, gloo

On GPUs (one per rank) the backend is nccl; on CPU it is gloo.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

import gr_fused
from gr_fused.distributed import local_ascent_step


def make_model():
    return torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.BatchNorm1d(64),
                               torch.nn.ReLU(), torch.nn.Linear(64, 10))


def run(rank, world, args, init_method):
    use_cuda = torch.cuda.is_available() and torch.cuda.device_count() >= world
    device = torch.device("cuda", rank) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if use_cuda else "gloo", init_method=init_method,
                            rank=rank, world_size=world)
    try:
        torch.manual_seed(0)  # the same initial model everywhere (DDP also broadcasts it)
        model = make_model().to(device)
        if args.fsdp2:
            from torch.distributed.fsdp import fully_shard
            for layer in (model[0], model[3]):
                fully_shard(layer)
            ddp = fully_shard(model)  # the sharded model is called directly
        else:
            ddp = DDP(model, device_ids=[rank] if use_cuda else None)
        opt = gr_fused.GRSGD(ddp.parameters(), lr=args.lr, momentum=0.9, weight_decay=5e-4,
                             gamma=args.gamma, rho=args.rho, max_grad_norm=args.clip)
        g = torch.Generator().manual_seed(1)
        teacher = torch.randn(32, 10, generator=g)
        for step in range(args.steps):
            x = torch.randn(world, args.batch, 32, generator=g)  # the global batch
            y = (x @ teacher).argmax(-1)
            x, y = x[rank].to(device), y[rank].to(device)  # this rank's shard of it

            def closure():
                opt.zero_grad()
                loss = F.cross_entropy(ddp(x), y)
                loss.backward()
                return loss

            if args.local_ascent:
                loss = local_ascent_step(opt, closure, model=ddp)
            else:
                loss = opt.step(closure)
            if rank == 0 and (step + 1) % max(1, args.steps // 10) == 0:
                print(f"step {step + 1:4d}  loss(rank 0) {float(loss.detach()):.4f}")

        # every replica must hold the same parameters (FSDP2: gather the full ones)
        full = [p.full_tensor() if args.fsdp2 else p for p in model.parameters()]
        flat = torch.cat([p.detach().reshape(-1) for p in full])
        gathered = [torch.empty_like(flat) for _ in range(world)]
        dist.all_gather(gathered, flat)
        if not all(torch.equal(gathered[0], t) for t in gathered):
            raise RuntimeError("the replicas diverged")
        if rank == 0:
            mode = ("fsdp2" if args.fsdp2 else
                    "local ascent" if args.local_ascent else "global ascent")
            print(f"{mode}: {world} replicas identical after training")
        dist.barrier()  # leave together: a rank tearing gloo down early can abort its peer
    finally:
        dist.destroy_process_group()


def run_spawned(rank, world, args, init_method):
    """A rank started by ``--spawn``: once ``run`` has destroyed its process group, it leaves
    without the interpreter's teardown, where a gloo thread still winding down has been seen
    to abort the process (rarely, on a loaded 2-core machine) after training succeeded.
    Each rank takes its share of the cores for its intra-op threads, as torchrun does."""
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    run(rank, world, args, init_method)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--local-ascent", action="store_true")
    parser.add_argument("--fsdp2", action="store_true", help="fully_shard instead of DDP")
    parser.add_argument("--clip", type=float, default=None, help="max_grad_norm")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--batch", type=int, default=32, help="per rank")
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--gamma", type=float, default=0.05)
    parser.add_argument("--rho", type=float, default=0.05)
    parser.add_argument("--spawn", type=int, default=0,
                        help="start this many ranks here instead of using torchrun")
    args = parser.parse_args(argv)
    if args.fsdp2 and args.local_ascent:
        parser.error("--local-ascent is for DDP (FSDP2 shards the parameters, not the ascent)")
    if args.spawn:
        with tempfile.TemporaryDirectory() as tmp:
            mp.spawn(run_spawned, args=(args.spawn, args, f"file://{os.path.join(tmp, 'rdzv')}"),
                     nprocs=args.spawn, join=True)
    else:  # torchrun sets RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT
        run(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), args, "env://")


if __name__ == "__main__":
    main()
