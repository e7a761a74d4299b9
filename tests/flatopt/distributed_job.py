"""Two-process CPU training job for ``test_distributed.py``, run as a script, never collected.

    python distributed_job.py MODE OUT_DIR WEIGHTS [WEIGHTS ...]

trains the same small classifier with ``flatopt.LearnedOptimizer`` once per ``WEIGHTS`` (a release
folder), in two processes over the gloo backend, and writes ``OUT_DIR/rank{0,1}.pt``. MODE is
``ddp`` (DistributedDataParallel), ``fsdp2`` (``fully_shard``) or ``zero`` (DDP with
``ZeroRedundancyOptimizer``). It also writes ``OUT_DIR/single.pt``, the same training in one process
on the union of both ranks' batches, which DDP's gradient averaging makes the same computation.

Every run saves the optimizer's state halfway, rebuilds the optimizer and loads the state back, so
that resuming from a checkpoint is exercised in each mode.

Each file holds ``{weights: {"losses": [float per step], "params": {name: full tensor}}}``.
"""

import datetime
import gc
import io
import os
import sys

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import flatopt

WORLD_SIZE = 2
STEPS = 100
BATCH_PER_RANK = 16
# A collective that waits longer than this raises instead of hanging the test suite.
COLLECTIVE_TIMEOUT = datetime.timedelta(seconds=60)


class TinyClassifier(nn.Module):
    """An MLP 8-16-3 with a learned logit scale.

    The scale is a one-element parameter, so FSDP2 leaves the second rank an empty shard of it, and
    the output layer's three rows split unevenly (two and one).
    """

    def __init__(self):
        super().__init__()
        self.hidden = nn.Linear(8, 16)
        self.out = nn.Linear(16, 3)
        self.log_scale = nn.Parameter(torch.zeros(1))

    def forward(self, x):
        return self.out(torch.tanh(self.hidden(x))) * self.log_scale.exp()


def make_dataset():
    """Return ``(x, y)``: 256 points labelled by a fixed random linear map, so a fit is possible."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(256, 8, generator=generator)
    y = (x @ torch.randn(8, 3, generator=generator)).argmax(dim=1)
    return x, y


def union_batch(dataset, step):
    """Return the batch of every rank at ``step``, rank 0's rows first."""
    x, y = dataset
    size = BATCH_PER_RANK * WORLD_SIZE
    start = (step * size) % len(x)
    return x[start : start + size], y[start : start + size]


def rank_batch(dataset, step, rank):
    x, y = union_batch(dataset, step)
    rows = slice(rank * BATCH_PER_RANK, (rank + 1) * BATCH_PER_RANK)
    return x[rows], y[rows]


def make_model(mode):
    """Build the classifier from one seed, wrapped for ``mode``; return ``(wrapped, inner)``."""
    torch.manual_seed(0)
    model = TinyClassifier()
    if mode in ("ddp", "zero"):
        return nn.parallel.DistributedDataParallel(model), model
    if mode == "fsdp2":
        from torch.distributed.fsdp import fully_shard

        fully_shard(model.hidden)
        fully_shard(model.out)
        fully_shard(model)
    return model, model


def make_optimizer(mode, params, weights):
    if mode == "zero":
        from torch.distributed.optim import ZeroRedundancyOptimizer

        return ZeroRedundancyOptimizer(
            params, optimizer_class=flatopt.LearnedOptimizer, weights=weights
        )
    return flatopt.LearnedOptimizer(params, weights)


def resumed(mode, optimizer, params, weights):
    """Return a new optimizer loaded from ``optimizer``'s state, saved and read back as bytes."""
    if mode == "zero":
        # ZeRO gathers its sharded state on one rank; every rank then loads the whole of it.
        optimizer.consolidate_state_dict(to=0)
        state = [optimizer.state_dict() if dist.get_rank() == 0 else None]
        dist.broadcast_object_list(state, src=0)
        state = state[0]
    else:
        state = optimizer.state_dict()
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    optimizer = make_optimizer(mode, params, weights)
    optimizer.load_state_dict(torch.load(buffer))
    return optimizer


def train(mode, weights, rank=0):
    """Train ``STEPS`` steps; return the losses this process saw and the final parameters."""
    dataset = make_dataset()
    model, inner = make_model(mode)
    params = list(model.parameters())
    optimizer = make_optimizer(mode, params, weights)
    losses = []
    for step in range(STEPS):
        if step == STEPS // 2:
            optimizer = resumed(mode, optimizer, params, weights)
        x, y = union_batch(dataset, step) if mode == "single" else rank_batch(dataset, step, rank)
        optimizer.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())

    final = {}
    for name, p in inner.named_parameters():
        # full_tensor() is a collective: every rank reaches it, in the same order.
        full = p.full_tensor() if hasattr(p, "full_tensor") else p
        final[name] = full.detach().clone()
    return {"losses": losses, "params": final}


def _worker(rank, mode, out_dir, all_weights):
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method="file://" + os.path.join(out_dir, "rendezvous"),
        rank=rank,
        world_size=WORLD_SIZE,
        timeout=COLLECTIVE_TIMEOUT,
    )
    try:
        results = {weights: train(mode, weights, rank) for weights in all_weights}
        # Note: ZeroRedundancyOptimizer's broadcasts can leave gloo work objects holding tensors
        # until they are collected; freed during interpreter shutdown they abort the process
        # (a torch issue, not the optimizer's). Collect them while the group is still up.
        gc.collect()
        dist.barrier()
    finally:
        dist.destroy_process_group()
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))


def main(argv):
    mode, out_dir, all_weights = argv[0], argv[1], argv[2:]
    if mode not in ("ddp", "fsdp2", "zero") or not all_weights:
        raise SystemExit(__doc__)
    # gloo connects through the interface of the host name, which a container may not route to.
    if sys.platform == "linux":
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    mp.spawn(_worker, args=(mode, out_dir, all_weights), nprocs=WORLD_SIZE)

    torch.set_num_threads(1)
    single = {weights: train("single", weights) for weights in all_weights}
    torch.save(single, os.path.join(out_dir, "single.pt"))


if __name__ == "__main__":
    main(sys.argv[1:])
