"""KDTrainer under accelerate's FSDP version 2 (two CPU processes over gloo) trains the same student
as one process, with ``fused=False`` and ``fused=True``: the same logged losses, evaluation loss and
final weights; the teacher is sharded for inference and resharded after every step.

Run as a script (``python tests/test_transformers_fsdp.py OUT``, one process or under
``torch.distributed.run``), this file trains both variants and writes, on rank 0, each one's
student (``OUT/<variant>/model.safetensors``) and a report (``OUT/<variant>.json``).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

transformers = pytest.importorskip("transformers")

import kdcore  # noqa: E402
from kdcore.integrations.transformers import KDTrainer, prepare_teacher  # noqa: E402

VOCAB, LENGTH, ROWS = 128, 12, 16
VARIANTS = {"materialized": False, "fused": True}


def gpt2(seed: int):
    """A 2-block GPT-2 (n_embd 32, tied LM head) without dropout, so both runs compute the same."""
    torch.manual_seed(seed)
    config = transformers.GPT2Config(vocab_size=VOCAB, n_positions=32, n_embd=32, n_layer=2, n_head=2,
                                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=None,
                                     eos_token_id=None)
    return transformers.GPT2LMHeadModel(config)


class Rows(torch.utils.data.Dataset):
    """Random token rows from a fixed seed: prompts of 3 tokens (label -100) and padded tails of
    different lengths, so rows count different numbers of target tokens."""

    def __init__(self, rows: int, seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        self.input_ids = torch.randint(VOCAB, (rows, LENGTH), generator=g)
        lengths = torch.randint(6, LENGTH + 1, (rows,), generator=g)
        self.attention_mask = (torch.arange(LENGTH)[None] < lengths[:, None]).long()
        self.labels = self.input_ids.clone()
        self.labels[:, :3] = -100
        self.labels[self.attention_mask == 0] = -100

    def __len__(self) -> int:
        return len(self.input_ids)

    def __getitem__(self, i):
        return {"input_ids": self.input_ids[i], "attention_mask": self.attention_mask[i], "labels": self.labels[i]}


class CPUFSDPTrainer(KDTrainer):
    """KDTrainer whose accelerator takes its FSDP path on CPU. accelerate 1.15 turns FSDP on only
    for accelerator devices (``AcceleratorState`` enters its FSDP branch for MULTI_GPU, MULTI_XPU,
    ...): on a CPU process group it drops the plugin and Trainer trains under DDP without a word.
    Marking the state FSDP with the plugin Trainer built from ``fsdp_config`` is what accelerate
    does on a GPU; sharding, preparation and state-dict gathering then run accelerate's and
    torch's own FSDP2 code over gloo."""

    def create_accelerator_and_postprocess(self) -> None:
        super().create_accelerator_and_postprocess()
        if not self.args.fsdp:
            return
        from accelerate.state import PartialState
        from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

        state = self.accelerator.state
        PartialState._shared_state["distributed_type"] = state.distributed_type = DistributedType.FSDP
        state.fsdp_plugin = FullyShardedDataParallelPlugin(**self.args.fsdp_plugin_args)
        self.is_fsdp_enabled = True


def train(out: Path, variant: str) -> None:
    """Four SGD steps of a global batch of 8 rows (per-device batch x processes x accumulation),
    logged every step, then an evaluation on global batches of 2 rows (the loss of each batch is
    over its tokens, so both runs must group the same rows); rank 0 saves the gathered student and
    the report."""
    processes = int(os.environ.get("WORLD_SIZE", "1"))
    sharded = {"fsdp": True, "fsdp_config": {"version": 2, "transformer_layer_cls_to_wrap": ["GPT2Block"]}}
    args = transformers.TrainingArguments(
        output_dir=str(out / variant), per_device_train_batch_size=4 // processes,
        per_device_eval_batch_size=2 // processes, gradient_accumulation_steps=2, max_steps=4, learning_rate=0.1,
        optim="sgd", lr_scheduler_type="constant", logging_steps=1, report_to=[], use_cpu=True, save_strategy="no",
        seed=0, data_seed=0, dataloader_drop_last=True, **(sharded if processes > 1 else {}))
    trainer = CPUFSDPTrainer(model=gpt2(0), args=args, train_dataset=Rows(ROWS, 3), eval_dataset=Rows(8, 4),
                             teacher=gpt2(5), kd_options={"temperature": 2.0, "ce_weight": 0.5, "divergence": "jsd",
                                                          "fused": VARIANTS[variant]})
    trainer.train()
    teacher_types_after_step = [type(p).__name__ for p in trainer.teacher.parameters()]
    metrics = trainer.evaluate()
    teacher_types_after_eval = [type(p).__name__ for p in trainer.teacher.parameters()]
    trainer.save_model(str(out / variant))
    if trainer.accelerator.is_main_process:
        from torch.distributed.fsdp import FSDPModule

        report = {"losses": [entry["loss"] for entry in trainer.state.log_history if "loss" in entry],
                  "eval_loss": metrics["eval_loss"], "student_sharded": isinstance(trainer.model, FSDPModule),
                  "teacher_groups": len(trainer.teacher_shards),
                  "teacher_after_step": sorted(set(teacher_types_after_step)),
                  "teacher_after_eval": sorted(set(teacher_types_after_eval))}
        (out / f"{variant}.json").write_text(json.dumps(report))


def launch(out: Path, processes: int) -> dict[str, dict]:
    """Runs this file as a script in ``processes`` processes (one: plain Python), importing the
    kdcore under test, and reads back the reports and saved students of both variants."""
    from safetensors.torch import load_file

    here = [str(Path(kdcore.__file__).parents[1]), str(Path(__file__).parent)]  # this kdcore, these tests
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [*here, os.environ.get("PYTHONPATH")]))}
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={processes}"]
                if processes > 1 else [sys.executable])
    done = subprocess.run([*launcher, __file__, str(out)], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    return {variant: {**json.loads((out / f"{variant}.json").read_text()),
                      "weights": load_file(out / variant / "model.safetensors")} for variant in VARIANTS}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    return {"fsdp": launch(tmp_path_factory.mktemp("fsdp"), 2), "single": launch(tmp_path_factory.mktemp("single"), 1)}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_fsdp2_trains_the_same_student_as_one_process(runs, variant):
    """Four fp32 steps whose gradients differ only in summation order (each process sums its half
    of the batch, then FSDP's reduce-scatter averages the halves): a few ulps per step; measured
    2e-7 relative on the losses and 7e-9 on the weights. rtol 1e-4 / atol 1e-5 leaves three orders of magnitude of margin while a
    gradient off by the process count (the normalization) moves weights by 6e-3 and fails."""
    sharded, single = runs["fsdp"][variant], runs["single"][variant]
    assert sharded["student_sharded"] and not single["student_sharded"]
    assert len(sharded["losses"]) == len(single["losses"]) == 4
    torch.testing.assert_close(sharded["losses"], single["losses"], rtol=1e-4, atol=1e-5)
    assert sharded["eval_loss"] == pytest.approx(single["eval_loss"], rel=1e-4, abs=1e-5)
    initial = gpt2(0).state_dict()
    assert not torch.allclose(single["weights"]["transformer.wte.weight"], initial["transformer.wte.weight"])
    for name, weight in single["weights"].items():
        torch.testing.assert_close(sharded["weights"][name], weight, rtol=1e-4, atol=1e-5, msg=name)


def test_fused_equals_materialized_under_fsdp2(runs):
    """The fused loss reads both LM heads while FSDP holds them gathered: the same losses as the
    materialized one (fp32, the same matmuls chunk by chunk)."""
    fused, plain = runs["fsdp"]["fused"], runs["fsdp"]["materialized"]
    torch.testing.assert_close(fused["losses"], plain["losses"], rtol=1e-5, atol=0)
    assert fused["eval_loss"] == pytest.approx(plain["eval_loss"], rel=1e-5)


def test_teacher_is_sharded_for_inference_and_resharded(runs):
    """One FSDP group per GPT2Block plus the root; after training and after evaluation every
    teacher parameter is a shard again (the root, gathered by its forward, is freed by the trainer)."""
    for variant in VARIANTS:
        report = runs["fsdp"][variant]
        assert report["teacher_groups"] == 3
        assert report["teacher_after_step"] == report["teacher_after_eval"] == ["DTensor"]
        assert runs["single"][variant]["teacher_groups"] == 0


def test_fsdp1_with_a_teacher_is_refused():
    from accelerate.utils import DistributedType

    accelerator = SimpleNamespace(distributed_type=DistributedType.FSDP,
                                  state=SimpleNamespace(fsdp_plugin=SimpleNamespace(fsdp_version=1)))
    with pytest.raises(ValueError, match=r"fsdp_version 1; set fsdp_config=\{'version': 2\}"):
        prepare_teacher(gpt2(5), accelerator, torch.device("cpu"))


if __name__ == "__main__":
    for name in VARIANTS:
        train(Path(sys.argv[1]), name)
