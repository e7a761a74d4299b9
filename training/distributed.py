"""Meta-training in several processes: the process group and the few collectives the trainer needs.

Launched by ``torchrun`` (``WORLD_SIZE`` above 1 in the environment), every process builds the same
trainer and :func:`join` starts ``torch.distributed``: gloo for a CPU run, NCCL for a CUDA one, the
backend following the device the update rule lives on. A single process gets a :class:`Processes`
of size one whose collectives hand their input back untouched, so the trainer has one code path and
a single-process run computes exactly what it always did.
"""

import os

import torch
import torch.distributed as dist


class Processes:
    """The processes meta-training one update rule together, as seen from one of them.

    Attributes:
        rank: This process's index; process 0 writes the checkpoints, logs and releases.
        world_size: Number of processes.
        device: Where this process's collective buffers live (a CUDA device under NCCL).
    """

    def __init__(self, rank=0, world_size=1, device="cpu"):
        self.rank = rank
        self.world_size = world_size
        self.device = torch.device(device)

    @property
    def is_main(self):
        """Whether this is process 0, the one that writes files and prints."""
        return self.rank == 0

    def share(self, count):
        """This process's indices out of ``range(count)``: every ``world_size``-th from its rank."""
        return range(self.rank, count, self.world_size)

    def sum(self, tensor):
        """Sum ``tensor`` over the processes, in place, and return it (as is for one process)."""
        if self.world_size == 1:
            return tensor
        # NCCL reduces CUDA tensors only, gloo CPU ones: the buffer goes to this process's device.
        buffer = tensor.to(self.device)
        dist.all_reduce(buffer)
        if buffer is not tensor:
            tensor.copy_(buffer)
        return tensor

    def broadcast(self, value):
        """Return process 0's ``value`` (any picklable object) on every process."""
        if self.world_size == 1:
            return value
        box = [value]
        dist.broadcast_object_list(
            box, src=0, device=self.device if self.device.type == "cuda" else None
        )
        return box[0]


def launched_world_size():
    """Processes the launcher started (``WORLD_SIZE``; 1 without torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def local_device(device):
    """The device this process trains on: ``"cuda"`` means its own GPU under torchrun.

    Args:
        device: ``"cpu"``, ``"cuda"`` or an explicit device such as ``"cuda:1"``.

    Returns:
        A ``torch.device``; ``"cuda"`` becomes ``cuda:LOCAL_RANK`` when torchrun set it.
    """
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return device


def join(device):
    """Return the :class:`Processes` of this run, starting ``torch.distributed`` under torchrun.

    An already initialised default process group is used as it is. Otherwise, with ``WORLD_SIZE``
    above 1, the group is initialised from torchrun's environment (``MASTER_ADDR``,
    ``MASTER_PORT``, ``RANK``, ``WORLD_SIZE``), with NCCL when ``device`` is a CUDA device and
    gloo otherwise. Without either, the run is a single process.

    Args:
        device: The ``torch.device`` the update rule is trained on.

    Raises:
        RuntimeError: If several processes were launched but this torch has no torch.distributed.
    """
    device = torch.device(device)
    if dist.is_available() and dist.is_initialized():
        return Processes(dist.get_rank(), dist.get_world_size(), device)
    if launched_world_size() == 1:
        return Processes(device=device)
    if not dist.is_available():
        raise RuntimeError(
            f"WORLD_SIZE is {launched_world_size()} but this torch build has no torch.distributed; "
            "install a build with it or run a single process"
        )
    if device.type == "cuda":
        # NCCL and broadcast_object_list use the current device; it must be this process's GPU.
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Processes(dist.get_rank(), dist.get_world_size(), device)


def leave():
    """Shut the process group down, if one is running (call once, at the end of the program)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
