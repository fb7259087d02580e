"""The other ways to shrink a teacher that the demo measures beside distillation (int8 dynamic
quantization, magnitude pruning), and what every model costs: non-zero parameters, stored size,
single-example CPU latency."""

from __future__ import annotations

import copy
import statistics
import time
import warnings

import torch
from torch import nn
from torch.nn.utils import prune


def quantized(model: nn.Module) -> nn.Module:
    """Dynamic int8 quantization of the linear layers, with torch's eager-mode API (deprecated in
    favour of torchao, which kdcore does not depend on; its deprecation warnings are silenced)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        warnings.simplefilter("ignore", DeprecationWarning)
        from torch.ao.quantization import quantize_dynamic

        return quantize_dynamic(copy.deepcopy(model), {nn.Linear}, dtype=torch.qint8)


def pruned(model: nn.Module, budget: int) -> nn.Module:
    """The model with ``budget`` non-zero parameters: its biases and its largest-magnitude weights
    (all layers together)."""
    pruned = copy.deepcopy(model)
    weights = [(module, "weight") for module in pruned.modules() if isinstance(module, nn.Linear)]
    total = sum(module.weight.numel() for module, _ in weights)
    biases = sum(p.numel() for name, p in pruned.named_parameters() if not name.endswith("weight"))
    keep = max(1, budget - biases)
    prune.global_unstructured(weights, pruning_method=prune.L1Unstructured, amount=total - keep)
    for module, name in weights:
        prune.remove(module, name)
    return pruned


def footprint(model: nn.Module) -> tuple[int, float]:
    """Non-zero parameters and serialized size (int8 weights count one byte each)."""
    state = model.state_dict()
    nonzero, size = 0, 0
    for value in state.values():
        if isinstance(value, torch.Tensor):
            tensor = value.dequantize() if value.is_quantized else value
            nonzero += int((tensor != 0).sum())
            size += value.numel() * value.element_size()
        elif isinstance(value, tuple):  # packed int8 linear parameters: (weight, bias)
            for part in value:
                if isinstance(part, torch.Tensor):
                    nonzero += int((part.dequantize() if part.is_quantized else part).ne(0).sum())
                    size += part.numel() * part.element_size()
    return nonzero, size / 1024


def latency_us(model: nn.Module, example: torch.Tensor, repeats: int = 300) -> float:
    """Median single-example forward time on one CPU thread, in microseconds."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.inference_mode():
            for _ in range(20):
                model(example)
            times = []
            for _ in range(repeats):
                started = time.perf_counter()
                model(example)
                times.append(time.perf_counter() - started)
    finally:
        torch.set_num_threads(threads)
    return statistics.median(times) * 1e6
