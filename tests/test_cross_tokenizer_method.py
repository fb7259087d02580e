"""Distilling across tokenizers end to end: the cross_tokenizer_kd method in the Distiller (each
loss, fused, on-policy, checkpoints), the aligned_text dataset, per-byte perplexity, the errors a
user meets, and causal_lm_kd_loss / KDTrainer with two tokenizers."""

from __future__ import annotations

import json
import math

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

import kdcore  # noqa: E402
from kdcore import cli  # noqa: E402
from kdcore.cross_tokenizer import aligned_example, cross_tokenizer_kd_loss, load_tokenizer, shared_vocabulary  # noqa: E402
from kdcore.engine.config import ConfigError  # noqa: E402
from kdcore.engine.metrics import Meter  # noqa: E402
from kdcore.integrations.transformers import AlignedCollator, KDTrainer, causal_lm, causal_lm_kd_loss  # noqa: E402
from engine_helpers import (  # noqa: E402
    STUDENT_TOKENIZER,
    TEACHER_TOKENIZER,
    Crash,
    CrashAfterStep,
    cross_tokenizer_config,
    tokenized_gpt2_spec,
)


def teacher_pretrained(tmp_path):
    """Teachers in these tests are fresh models (weights do not matter to the mechanics); they need
    a checkpoint file."""
    torch.manual_seed(0)
    model = causal_lm(**tokenized_gpt2_spec(1024, TEACHER_TOKENIZER, width=48)["options"])
    path = tmp_path / "teacher.pt"
    torch.save(model.state_dict(), path)
    return str(path)


def with_teacher(cfg, path):
    cfg["teachers"][0]["checkpoint"] = path
    return cfg


@pytest.mark.parametrize("loss", ["uld", "shared_vocab", "hybrid"])
def test_each_loss_trains_and_reports_per_byte_perplexity(tmp_path, loss):
    cfg = with_teacher(cross_tokenizer_config(tmp_path / "run", method={"name": "cross_tokenizer_kd", "loss": loss, "ce_weight": 0.5}),
                       teacher_pretrained(tmp_path))
    metrics = kdcore.Distiller(cfg, console=False).fit()
    assert math.isfinite(metrics["byte_perplexity"]) and math.isfinite(metrics["teacher_byte_perplexity"])
    assert "teacher_agreement" not in metrics  # not defined across vocabularies
    events = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    steps = [e for e in events if e["event"] == "step"]
    assert steps and all(math.isfinite(e["kd"]) and e["kd"] > 0 for e in steps)


def test_the_teacher_is_scored_on_its_own_tokens(tmp_path):
    """Its token metrics count the teacher's labels (not the student's), and its per-byte
    perplexity counts the same text as the student's."""
    cfg = with_teacher(cross_tokenizer_config(tmp_path / "run", method={"name": "cross_tokenizer_kd"}), teacher_pretrained(tmp_path))
    run = kdcore.Distiller(cfg, console=False)
    metrics = run.fit()
    teacher_eval = next(json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
                        if json.loads(line)["event"] == "teacher_eval")
    assert teacher_eval["perplexity"] == pytest.approx(metrics["teacher_perplexity"])
    # a fresh 1024-token model: uniform-ish predictions, perplexity near its own vocabulary size
    assert 500 < teacher_eval["perplexity"] < 2500


def test_fused_equals_unfused_first_step(tmp_path):
    path = teacher_pretrained(tmp_path)
    losses = {}
    for fused in (False, True):
        cfg = with_teacher(cross_tokenizer_config(tmp_path / f"run{fused}", method={"name": "cross_tokenizer_kd", "fused": fused,
                                                                    "loss": "hybrid", "divergence": "jsd"}), path)
        kdcore.Distiller(cfg, console=False).fit()
        events = [json.loads(line) for line in (tmp_path / f"run{fused}" / "metrics.jsonl").read_text().splitlines()]
        losses[fused] = next(e["kd"] for e in events if e["event"] == "step")
    assert losses[True] == pytest.approx(losses[False], rel=1e-5)


def test_on_policy_steps_retokenize_the_student_s_samples(tmp_path):
    cfg = with_teacher(cross_tokenizer_config(tmp_path / "run", prompt_chars=24,
                              method={"name": "cross_tokenizer_kd", "lmbda": 1.0, "max_new_tokens": 8}),
                       teacher_pretrained(tmp_path))
    calls = []
    from kdcore.cross_tokenizer.retokenize import Retokenizer

    original = Retokenizer.__call__

    def spy(self, batch):
        out = original(self, batch)
        calls.append(out)
        return out

    Retokenizer.__call__ = spy
    try:
        metrics = kdcore.Distiller(cfg, console=False).fit()
    finally:
        Retokenizer.__call__ = original
    assert calls and math.isfinite(metrics["byte_perplexity"])
    batch = calls[0]
    assert (batch.spans >= 0).any()
    labelled = batch.labels != -100
    assert (batch.spans[~labelled] == -1).all()
    assert labelled.sum(1).max() <= 8  # only the generated tokens are labelled



def test_resume_after_a_crash_is_identical(tmp_path):
    """A crash in the second epoch (after the first epoch's checkpoint), then a resume: the same
    final student and metrics as an uninterrupted run (alignment comes from the data, which a
    resumed run visits in the same order)."""
    path = teacher_pretrained(tmp_path)
    method = {"name": "cross_tokenizer_kd", "loss": "hybrid", "ce_weight": 0.2}
    want = kdcore.Distiller(with_teacher(cross_tokenizer_config(tmp_path / "full", method=method, epochs=2), path), console=False).fit()
    cfg = with_teacher(cross_tokenizer_config(tmp_path / "half", method=method, epochs=2), path)
    with pytest.raises(Crash):
        kdcore.Distiller(cfg, console=False, callbacks=[CrashAfterStep(8)]).fit()
    got = kdcore.Distiller(cfg, console=False).fit(resume=True)
    assert got == want
    a = torch.load(tmp_path / "full" / "student.pt", weights_only=True)
    b = torch.load(tmp_path / "half" / "student.pt", weights_only=True)
    assert all(torch.equal(a[key], b[key]) for key in a)


def test_a_scratch_student_on_aligned_text_needs_only_its_tokenizer(tmp_path):
    cfg = cross_tokenizer_config(tmp_path / "run", method={"name": "supervised"}, teachers=False)
    metrics = kdcore.Distiller(cfg, console=False).fit()
    assert "byte_perplexity" in metrics


def test_missing_tokenizers_are_named(tmp_path):
    path = teacher_pretrained(tmp_path)
    cfg = with_teacher(cross_tokenizer_config(tmp_path / "a", method={"name": "cross_tokenizer_kd"}), path)
    del cfg["student"]["tokenizer"]
    with pytest.raises(ValueError, match="student.tokenizer"):
        kdcore.Distiller(cfg, console=False).fit()
    cfg = with_teacher(cross_tokenizer_config(tmp_path / "b", method={"name": "cross_tokenizer_kd"}), path)
    del cfg["teachers"][0]["tokenizer"]
    with pytest.raises(ValueError, match="teachers.0.tokenizer"):
        kdcore.Distiller(cfg, console=False).fit()
    cfg = with_teacher(cross_tokenizer_config(tmp_path / "c", method={"name": "cross_tokenizer_kd"}), path)
    cfg["teachers"][0]["tokenizer"] = str(tmp_path / "nothing.json")
    with pytest.raises(ConfigError, match="teachers.0.tokenizer"):
        kdcore.Distiller(cfg, console=False).fit()


def test_a_teacher_tokenizer_larger_than_the_teacher_is_caught_before_training(tmp_path):
    cfg = with_teacher(cross_tokenizer_config(tmp_path / "run", method={"name": "cross_tokenizer_kd"}), teacher_pretrained(tmp_path))
    cfg["teachers"][0]["tokenizer"] = STUDENT_TOKENIZER  # a 512-token tokenizer would fit; swap the sizes instead
    cfg["student"]["tokenizer"] = TEACHER_TOKENIZER  # ids up to 1023 into a 512-token student
    with pytest.raises(ConfigError, match="student.options.vocab_size"):
        kdcore.Distiller(cfg, console=False).fit()
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_a_dataset_without_a_teacher_view_is_refused(tmp_path):
    cfg = with_teacher(cross_tokenizer_config(tmp_path / "run", method={"name": "cross_tokenizer_kd"}), teacher_pretrained(tmp_path))
    cfg["data"] = {"dataset": "text", "options": {"seq_len": 32, "max_bytes": 3000}, "batch_size": 8}
    cfg["student"]["options"]["vocab_size"] = 1024
    with pytest.raises(ValueError, match="aligned_text"):
        kdcore.Distiller(cfg, console=False).fit()


@pytest.mark.parametrize("options, message", [({"loss": "l1"}, "loss must be one of"), ({"lmbda": 2}, "lmbda"),
                                              ({"fused": "yes"}, "fused"), ({"temperature": -1}, "temperature"),
                                              ({"teacher_max_length": 1}, "teacher_max_length"),
                                              ({"vocabulary": "fuzzy"}, "vocabulary must be one of"),
                                              ({"fused": True, "ce_weight": 0.5}, "ce_weight > 0 with fused"),
                                              ({"tau": 1}, "unknown config keys")])
def test_bad_method_options_are_named(tmp_path, options, message):
    cfg = cross_tokenizer_config(tmp_path / "run", method={"name": "cross_tokenizer_kd", **options})
    cfg["teachers"][0]["pretrained"] = True
    with pytest.raises(ConfigError, match=message):
        kdcore.Distiller(cfg, console=False)


def test_the_cli_names_a_dataset_without_a_teacher_view_in_one_line(tmp_path, capsys):
    import yaml

    cfg = with_teacher(cross_tokenizer_config(tmp_path / "run", method={"name": "cross_tokenizer_kd"}), teacher_pretrained(tmp_path))
    cfg["data"] = {"dataset": "text", "options": {"seq_len": 32, "max_bytes": 3000}, "batch_size": 8}
    cfg["student"]["options"]["vocab_size"] = 1024
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert cli.main(["distill", str(path)]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("kdcore")]
    assert err == ["kdcore distill: method: cross_tokenizer_kd: data.dataset 'text' gives no teacher view of the text; "
                   "use a dataset that tokenizes for both models (data.dataset: aligned_text)"]


def test_cache_teacher_refuses_a_teacher_with_its_own_tokenizer(tmp_path, capsys):
    import yaml

    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(with_teacher(cross_tokenizer_config(tmp_path / "run", method={"name": "cross_tokenizer_kd"}),
                                                teacher_pretrained(tmp_path))))
    assert cli.main(["cache-teacher", str(path), "--output", str(tmp_path / "cache")]) == 2
    assert "another tokenizer" in capsys.readouterr().err


def test_meter_per_byte_perplexity():
    meter = Meter(task="language_modeling")
    logits = torch.zeros(1, 3, 4)  # uniform: nll = log 4 per token
    meter.update(logits, torch.tensor([[1, 2, -100]]), label_bytes=torch.tensor([[3, 5, 7]]))
    out = meter.compute()
    assert out["byte_perplexity"] == pytest.approx(math.exp(2 * math.log(4) / 8))
    assert out["perplexity"] == pytest.approx(4.0)


# -- Hugging Face --------------------------------------------------------------------------------


def hf_batch(tokenizer, texts, prompt_tokens=0):
    rows = [tokenizer.encode(text).ids for text in texts]
    length = max(map(len, rows))
    ids = torch.zeros(len(rows), length, dtype=torch.long)
    mask = torch.zeros_like(ids)
    labels = torch.full_like(ids, -100)
    for r, row in enumerate(rows):
        ids[r, :len(row)] = torch.tensor(row)
        mask[r, :len(row)] = 1
        labels[r, 1 + prompt_tokens:len(row)] = torch.tensor(row[1 + prompt_tokens:])
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


TEXTS = ["First Citizen:\nBefore we proceed any further, hear me speak.", "All:\nSpeak, speak."]


def models():
    torch.manual_seed(0)
    student = causal_lm(**tokenized_gpt2_spec(512, STUDENT_TOKENIZER)["options"]).eval()
    teacher = causal_lm(**tokenized_gpt2_spec(1024, TEACHER_TOKENIZER, width=48)["options"]).eval()
    return student, teacher


@pytest.mark.parametrize("loss", ["uld", "shared_vocab", "hybrid"])
def test_causal_lm_kd_loss_across_tokenizers_equals_the_aligned_dataset_loss(loss):
    """The loss of a Hugging Face batch (re-tokenized for the teacher in the step) equals the loss
    on the same texts as aligned_text lays them out, fused or not, with the collator or without."""
    st, tt = load_tokenizer(STUDENT_TOKENIZER), load_tokenizer(TEACHER_TOKENIZER)
    student, teacher = models()
    batch = hf_batch(st, TEXTS)
    options = dict(student_tokenizer=st, teacher_tokenizer=tt, loss=loss, divergence="jsd", temperature=2.0)
    plain = causal_lm_kd_loss(student, teacher, batch, **options)
    fused = causal_lm_kd_loss(student, teacher, batch, fused=True, **options)
    collated = causal_lm_kd_loss(student, teacher, AlignedCollator(lambda features: features[0], st, tt)([batch]),
                                 **options)
    items = [aligned_example(text, st, tt, student_length=47, teacher_length=47) for text in TEXTS]
    labels = torch.stack([item["labels"] for item in items])
    spans = torch.stack([item["spans"] for item in items])
    t_labels = torch.stack([item["teacher_view"]["labels"] for item in items])
    t_spans = torch.stack([item["teacher_view"]["spans"] for item in items])
    with torch.no_grad():
        s_logits = student(input_ids=torch.stack([i["input_ids"] for i in items]),
                           attention_mask=torch.stack([i["attention_mask"] for i in items])).logits
        t_logits = teacher(input_ids=torch.stack([i["teacher_view"]["input_ids"] for i in items]),
                           attention_mask=torch.stack([i["teacher_view"]["attention_mask"] for i in items])).logits
    want = cross_tokenizer_kd_loss(s_logits, t_logits, student_labels=labels.masked_fill(spans < 0, 0),
                                   teacher_labels=t_labels.masked_fill(t_spans < 0, 0), student_spans=spans,
                                   teacher_spans=t_spans, vocabulary=shared_vocabulary(st, tt, "projected"), loss=loss,
                                   divergence="jsd", temperature=2.0, normalizer=(labels != -100).sum().float())
    for got in (plain, fused, collated):
        torch.testing.assert_close(got.detach(), want, rtol=1e-5, atol=1e-6)


def test_causal_lm_kd_loss_across_tokenizers_refuses_half_a_pair():
    st = load_tokenizer(STUDENT_TOKENIZER)
    student, teacher = models()
    with pytest.raises(ValueError, match="both student_tokenizer and teacher_tokenizer"):
        causal_lm_kd_loss(student, teacher, hf_batch(st, TEXTS), student_tokenizer=st)
    with pytest.raises(TypeError, match="unknown option"):
        causal_lm_kd_loss(student, teacher, hf_batch(st, TEXTS), loss="uld")


def test_kd_trainer_distils_across_tokenizers(tmp_path):
    st, tt = load_tokenizer(STUDENT_TOKENIZER), load_tokenizer(TEACHER_TOKENIZER)
    student, teacher = models()
    student.train()
    batch = hf_batch(st, TEXTS * 2)

    class Rows(torch.utils.data.Dataset):
        def __len__(self):
            return len(batch["input_ids"])

        def __getitem__(self, i):
            return {key: value[i] for key, value in batch.items()}

    args = transformers.TrainingArguments(output_dir=str(tmp_path / "out"), per_device_train_batch_size=2,
                                          max_steps=3, learning_rate=1e-3, report_to=[], use_cpu=True,
                                          save_strategy="no", logging_steps=1, remove_unused_columns=False)
    collator = AlignedCollator(torch.utils.data.default_collate, st, tt)
    before = [p.detach().clone() for p in student.parameters()]
    trainer = KDTrainer(model=student, args=args, train_dataset=Rows(), teacher=teacher, data_collator=collator,
                        kd_options={"student_tokenizer": st, "teacher_tokenizer": tt, "loss": "hybrid",
                                    "ce_weight": 0.5})
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(losses) == 3 and all(math.isfinite(x) for x in losses)
    assert any(not torch.equal(a, b.detach()) for a, b in zip(before, student.parameters()))
