"""What each process holds when a GPT-2 student is distilled from a GPT-2 teacher, with and
without FSDP: bytes of parameters, gradients and AdamW state of the student, and parameters of the
frozen teacher, counted on this process's tensors (the local shards under FSDP) after one
optimizer step, before the gradients are released. One JSON line per process and mode.

Run it under torchrun, any number of processes (gloo on CPU, nccl on CUDA)::

    torchrun --standalone --nproc-per-node 4 -m benchmarks.sharded_memory --width 256 --layers 4

Counting tensors rather than reading an allocator's peak makes the figure the same on CPU and GPU
and exact: it is the persistent state, without activations and without the one block FSDP gathers
at a time (reported as ``largest_gathered_block_bytes``).
"""

from __future__ import annotations

import argparse
import json
import os

import torch
import torch.distributed as dist
from torch import nn

from kdcore import kd_loss
from kdcore.parallel import fsdp


def local_bytes(tensors) -> int:
    """Bytes of this process's part of ``tensors`` (a DTensor's local shard, else the tensor)."""
    total = 0
    for tensor in tensors:
        if tensor is None:
            continue
        local = tensor.to_local() if hasattr(tensor, "to_local") else tensor
        total += local.numel() * local.element_size()
    return total


def gpt2(width: int, layers: int, vocab: int) -> nn.Module:
    import transformers

    config = transformers.GPT2Config(n_embd=width, n_layer=layers, n_head=max(1, width // 64), vocab_size=vocab,
                                     n_positions=128, bos_token_id=None, eos_token_id=None)
    return transformers.GPT2LMHeadModel(config)


def measure(mode: str, args, device: torch.device) -> dict:
    torch.manual_seed(0)
    student = gpt2(args.width, args.layers, args.vocab)
    teacher = gpt2(args.width * 2, args.layers * 2, args.vocab).requires_grad_(False).eval()
    block = max(sum(p.numel() * p.element_size() for p in b.parameters()) for b in student.transformer.h)
    count = sum(p.numel() for p in student.parameters())
    if mode == "fsdp":
        mesh = fsdp.mesh(device, dist.get_world_size())
        fsdp.shard(student, mesh, blocks={"GPT2Block"}, trainable=True)
        fsdp.shard(teacher, mesh, blocks={"GPT2Block"}, trainable=False)
    else:
        student, teacher = student.to(device), teacher.to(device)
        student = nn.parallel.DistributedDataParallel(student) if dist.get_world_size() > 1 else student
    optimizer = torch.optim.AdamW(student.parameters(), lr=1e-3)
    tokens = torch.randint(0, args.vocab, (args.batch, 64), device=device)
    with torch.no_grad():
        teacher_logits = teacher(input_ids=tokens).logits
    loss = kd_loss(student(input_ids=tokens).logits, teacher_logits, temperature=2.0)
    loss.backward()
    optimizer.step()
    fsdp.reshard(teacher)  # its root stays gathered after forward until the step is done with it
    parameters = list(student.parameters())
    record = {
        "benchmark": "sharded_memory", "mode": mode, "rank": dist.get_rank(), "processes": dist.get_world_size(),
        "student_parameters": count,
        "student_parameter_bytes": local_bytes(parameters),
        "student_gradient_bytes": local_bytes(p.grad for p in parameters),
        "optimizer_state_bytes": local_bytes(v for state in optimizer.state.values() for v in state.values()
                                             if isinstance(v, torch.Tensor) and v.dim() > 0),
        "teacher_parameter_bytes": local_bytes(teacher.parameters()),
        "largest_gathered_block_bytes": block if mode == "fsdp" else 0,
    }
    return record


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--width", type=int, default=128)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--batch", type=int, default=4)
    args = parser.parse_args()
    use_cuda = torch.cuda.is_available()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if use_cuda:
        torch.cuda.set_device(local_rank)
    dist.init_process_group("nccl" if use_cuda else "gloo")
    device = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    for mode in ("ddp", "fsdp"):
        print(json.dumps(measure(mode, args, device)), flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
