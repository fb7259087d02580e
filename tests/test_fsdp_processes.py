"""``training.parallel: fsdp`` over several processes (FSDP2 over gloo on CPU, launched by
``torchrun``): the sharded run trains the model DDP trains, a SIGKILLed one resumes bit-identical,
and a run checkpointed on N processes resumes on M."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
import yaml

import kdcore

from engine_helpers import DATA, classification_config, gpt2_spec, kill_at, launch, text_config, torchrun

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore::UserWarning")]


def lm_run(directory, parallel, **training):
    """Fused logit distillation between Hugging Face GPT-2s on the shipped text: 12 examples a
    step in 2 micro-batches (so 1, 2 and 3 processes all split it), a checkpoint every 2 steps."""
    return text_config(directory, teachers=[{**gpt2_spec(layers=2), "pretrained": True}],
                       method={"name": "llm_kd", "fused": True, "divergence": "jsd", "ce_weight": 0.5},
                       max_bytes=1600, data={"dataset": "text", "batch_size": 12, "eval_batch_size": 32,
                                             "options": {"seq_len": 16, "prompt_len": 6, "max_bytes": 1600}},
                       checkpoint={"every_steps": 2},
                       training={"epochs": 1, "grad_accum": 2, "log_every": 1, "parallel": parallel, **training})


def write(config, path):
    path.write_text(yaml.safe_dump(config))
    return path


def steps(directory):
    return [e for e in map(json.loads, (directory / "metrics.jsonl").read_text().splitlines()) if e["event"] == "step"]


def weights(directory):
    return torch.load(directory / "student.pt", weights_only=True)


def assert_close_runs(ours, theirs, metrics, reference):
    """Equal up to the order of float32 sums (gradients reduced over other process counts)."""
    assert metrics.keys() == reference.keys()
    for key in reference:
        assert metrics[key] == pytest.approx(reference[key], rel=1e-3, abs=1e-4), key
    a, b = weights(ours), weights(theirs)
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-5)
    assert [e["step"] for e in steps(ours)] == [e["step"] for e in steps(theirs)]
    for x, y in zip(steps(ours), steps(theirs)):
        assert x["total"] == pytest.approx(y["total"], rel=1e-4)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    pytest.importorskip("transformers")
    directory = tmp_path_factory.mktemp("fsdp")
    metrics = torchrun(write(lm_run(directory / "run", "fsdp"), directory / "run.yaml"), 2)
    return directory / "run", metrics


def test_fsdp_trains_what_ddp_trains(tmp_path, uninterrupted):
    """The sharded run's fused loss (LM heads gathered with the models' roots) against DDP's
    unfused one: the same steps, weights and held-out metrics."""
    config = lm_run(tmp_path / "ddp", "ddp")
    config["method"]["fused"] = False
    ddp = torchrun(write(config, tmp_path / "ddp.yaml"), 2)
    directory, fsdp = uninterrupted
    assert_close_runs(directory, tmp_path / "ddp", fsdp, ddp)
    assert sorted(weights(directory)) == sorted(weights(tmp_path / "ddp"))  # a plain state dict, same names


def test_fsdp_trains_added_modules_as_ddp_does(tmp_path, teacher):
    """FitNets' regressors (modules the method adds) sharded with the student; an evaluation split
    of 97 examples in batches of 48 gives the processes unequal numbers of batches (2 and 1)."""
    runs = {}
    for parallel in ("fsdp", "ddp"):
        config = classification_config(tmp_path / parallel, method={"name": "fitnets", "hints": [["body.1", "body.3"]]},
                                       teachers=[teacher], optimizer={"name": "adamw", "lr": 0.01},
                                       data={**DATA, "eval_batch_size": 48,
                                             "options": {**DATA["options"], "val_size": 97}},
                                       training={"epochs": 2, "grad_accum": 2, "log_every": 1, "parallel": parallel})
        runs[parallel] = torchrun(write(config, tmp_path / f"{parallel}.yaml"), 2)
    assert_close_runs(tmp_path / "fsdp", tmp_path / "ddp", runs["fsdp"], runs["ddp"])


def test_sigkilled_fsdp_run_resumes_bit_identical_and_on_other_process_counts(tmp_path, uninterrupted):
    reference_dir, reference = uninterrupted
    config = lm_run(tmp_path / "run", "fsdp")
    kill_at(write(config, tmp_path / "run.yaml"), 2, 4, tmp_path / "killed.py")
    saved = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)
    assert saved["stage_state"]["step"] == 4 and len(saved["rng"]) == 2
    for processes in (3, 1):  # copies of the killed run, resumed on another number of processes
        shutil.copytree(tmp_path / "run", tmp_path / f"on{processes}")
    resumed = torchrun(tmp_path / "run.yaml", 2, "--resume")
    assert resumed == reference
    assert steps(tmp_path / "run") == [{**e, "examples_per_s": mine["examples_per_s"]}
                                       for e, mine in zip(steps(reference_dir), steps(tmp_path / "run"))]
    a, b = weights(tmp_path / "run"), weights(reference_dir)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    for processes in (3, 1):
        moved = {**config, "output_dir": str(tmp_path / f"on{processes}")}
        metrics = torchrun(write(moved, tmp_path / f"on{processes}.yaml"), processes, "--resume")
        assert_close_runs(tmp_path / f"on{processes}", reference_dir, metrics, reference)


def test_on_policy_generation_under_fsdp_matches_ddp(tmp_path):
    """gkd samples with the sharded student on every process and trains what DDP trains."""
    runs = {}
    for parallel in ("fsdp", "ddp"):
        config = lm_run(tmp_path / parallel, parallel)
        config["method"] = {"name": "gkd", "lmbda": 1.0, "max_new_tokens": 6, "eos_token_id": 32}
        runs[parallel] = torchrun(write(config, tmp_path / f"{parallel}.yaml"), 2)
    assert_close_runs(tmp_path / "fsdp", tmp_path / "ddp", runs["fsdp"], runs["ddp"])


GENERATE_UNEVENLY = """
import json, sys
import torch, torch.distributed as dist, transformers
from kdcore.engine.data import Batch
from kdcore.integrations.generation import GenerationOptions, continue_prompts
from kdcore.parallel import fsdp

dist.init_process_group("gloo")
rank = dist.get_rank()
torch.manual_seed(0)
model = transformers.GPT2LMHeadModel(transformers.GPT2Config(
    n_layer=2, n_embd=32, n_head=2, vocab_size=256, n_positions=64, bos_token_id=None, eos_token_id=None)).eval()
prompt = torch.tensor([[5, 6, 7, 8]]) + rank
batch = Batch({"input_ids": prompt, "attention_mask": torch.ones_like(prompt)}, torch.tensor([[-100, -100, -100, 1]]))
whole = continue_prompts(model, batch, -100, GenerationOptions(max_new_tokens=6), method="test")
first = int(whole.labels[0, 3])
fsdp.shard(model, fsdp.mesh(torch.device("cpu"), 2), blocks={"GPT2Block"}, trainable=False)
# the first process's row ends at its first token; the second's runs all six steps
options = GenerationOptions(max_new_tokens=6, eos_token_id=first if rank == 0 else None)
sharded = continue_prompts(model, batch, -100, options, method="test")
with open(sys.argv[1] + f"/rank{rank}.json", "w") as out:
    json.dump({"whole": whole.inputs["input_ids"].tolist(), "sharded": sharded.inputs["input_ids"].tolist()}, out)
dist.barrier()
dist.destroy_process_group()
"""


def test_sharded_generation_keeps_processes_in_step_when_rows_end_unevenly(tmp_path):
    """Each generation step of a sharded model gathers parameters from every process, so a process
    whose rows all ended keeps stepping with the others (without that, the run hangs)."""
    script = tmp_path / "generate.py"
    script.write_text(GENERATE_UNEVENLY)
    done = launch(2, str(script), str(tmp_path), timeout=180)  # a hang is the failure this test looks for
    assert done.returncode == 0, done.stderr[-4000:]
    printed = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    assert len(printed[0]["sharded"][0]) == 4  # prompt + its one token, less the last input position
    assert printed[1]["sharded"] == printed[1]["whole"] and len(printed[1]["whole"][0]) == 9


def test_buffers_agree_across_processes_and_resume_exactly(tmp_path):
    """Each process updates its own BatchNorm statistics; the first process's are every process's
    before each forward pass (as DDP does), an evaluation and a save, so FSDP trains and scores what
    DDP does, the held-out metrics are those of the saved student, and a SIGKILLed run resumes
    bit-identical."""
    def config(name, parallel):
        return classification_config(tmp_path / name, method={"name": "supervised"},
                                     student={"model": "engine_helpers:batchnorm_classifier"},
                                     optimizer={"name": "adamw", "lr": 0.01}, checkpoint={"every_steps": 1},
                                     training={"epochs": 2, "log_every": 1, "parallel": parallel})
    ddp = torchrun(write(config("ddp", "ddp"), tmp_path / "ddp.yaml"), 2)
    fsdp = torchrun(write(config("fsdp", "fsdp"), tmp_path / "fsdp.yaml"), 2)
    assert_close_runs(tmp_path / "fsdp", tmp_path / "ddp", fsdp, ddp)
    kill_at(write(config("killed", "fsdp"), tmp_path / "killed.yaml"), 2, 5, tmp_path / "killed.py")
    resumed = torchrun(tmp_path / "killed.yaml", 2, "--resume")
    assert resumed == fsdp
    a, b = weights(tmp_path / "killed"), weights(tmp_path / "fsdp")
    assert all(torch.equal(a[k], b[k]) for k in b)
    rescored = kdcore.Distiller(config("fsdp", "fsdp")).evaluate()
    assert rescored["accuracy"] == fsdp["accuracy"] and rescored["nll"] == pytest.approx(fsdp["nll"], rel=1e-6)
