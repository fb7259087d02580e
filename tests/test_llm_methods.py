"""The LLM distillation methods on tiny byte-level GPT-2s built from configs (offline): prompts
continued by generation (left-padded prompts give the same continuations as unpadded ones; only
generated tokens are labelled), sequence-level KD, on-policy GKD, reasoning distillation,
fused = materialized logit distillation, and training from a teacher-logit cache = from the teacher."""

from __future__ import annotations

import types

import pytest
import torch

transformers = pytest.importorskip("transformers")

import kdcore  # noqa: E402
from kdcore import cli  # noqa: E402
from kdcore.engine.data import Batch  # noqa: E402
from kdcore.integrations.generation import GenerationOptions, continue_prompts  # noqa: E402
from kdcore_plugins.gkd import GKD  # noqa: E402
from kdcore_plugins.reasoning_kd import answer_mask, marker_ids  # noqa: E402
from engine_helpers import gpt2_spec, text_config  # noqa: E402


def gpt2(seed=0, layers=1):
    torch.manual_seed(seed)
    config = transformers.GPT2Config(vocab_size=64, n_positions=40, n_embd=32, n_layer=layers, n_head=2,
                                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=None,
                                     eos_token_id=None)
    return transformers.GPT2LMHeadModel(config).eval()


def prompted_batch():
    """Rows with prompts of 3, 5 and 2 tokens; row 2 has two padding positions; row 3 has no
    label at all."""
    g = torch.Generator().manual_seed(3)
    input_ids = torch.randint(64, (4, 8), generator=g)
    labels = torch.roll(input_ids, -1, 1)
    mask = torch.ones_like(input_ids)
    for row, prompt in enumerate((3, 5, 2)):
        labels[row, :prompt - 1] = -100
    mask[2, -2:] = 0
    labels[2, -3:] = -100
    labels[3] = -100
    return Batch({"input_ids": input_ids, "attention_mask": mask}, labels)


def test_continuations_follow_the_unpadded_prompts_and_only_they_are_labelled():
    model, batch = gpt2(), prompted_batch()
    options = GenerationOptions(max_new_tokens=5, eos_token_id=7)
    out = continue_prompts(model, batch, -100, options, method="test")
    ids, labels, mask = out.inputs["input_ids"], out.labels, out.inputs["attention_mask"]
    for row, prompt in enumerate((3, 5, 2)):
        original = batch.inputs["input_ids"][row, :prompt]
        assert torch.equal(ids[row, :prompt], original)
        expected = model.generate(input_ids=original[None], attention_mask=torch.ones(1, prompt, dtype=torch.long),
                                  max_new_tokens=5, do_sample=False, pad_token_id=7, eos_token_id=7)[0, prompt:]
        if (expected == 7).any():
            expected = expected[: int((expected == 7).nonzero()[0]) + 1]
        new = len(expected)
        assert torch.equal(labels[row, prompt - 1: prompt - 1 + new], expected), row
        assert (labels[row, : prompt - 1] == -100).all() and (labels[row, prompt - 1 + new:] == -100).all()
        assert torch.equal(ids[row, prompt: prompt - 1 + new], expected[:-1])
        assert mask[row].sum() == prompt - 1 + new
    assert (labels[3] == -100).all()  # no label: all prompt, nothing generated
    assert torch.equal(ids[3, :7], batch.inputs["input_ids"][3, :7])
    assert model.training is False


def test_sampled_continuations_restore_training_mode_and_need_generate():
    model = gpt2().train()
    sampling = GenerationOptions(max_new_tokens=4, do_sample=True)
    out = continue_prompts(model, prompted_batch(), -100, sampling, method="t")
    assert model.training and out.labels.ne(-100).sum() == 3 * 4
    with pytest.raises(TypeError, match="t: Linear has no generate"):
        continue_prompts(torch.nn.Linear(2, 2), prompted_batch(), -100, GenerationOptions(), method="t")


def test_answer_mask_starts_at_the_first_marker():
    marker = torch.tensor(marker_ids("=>"))
    text = [-100, -100] + list(b"a=b=>12=>3")
    labels = torch.tensor([text, [-100] * 2 + list(b"no marker.")])
    mask = answer_mask(labels, marker, -100)
    assert mask[0].tolist() == [False] * 5 + [True] * 7
    assert not mask[1].any()
    with pytest.raises(ValueError, match="answer_marker"):
        marker_ids([])


def _stub_ctx(step, lmbda_model):
    return types.SimpleNamespace(run=types.SimpleNamespace(config=types.SimpleNamespace(seed=0)), index=0, step=step,
                                 ignore_index=-100, raw=lambda role: lmbda_model)


def test_gkd_draws_its_on_policy_steps_from_seed_and_step():
    method = GKD({"lmbda": 0.3, "max_new_tokens": 3})
    draws = [method.on_policy(_stub_ctx(step, None)) for step in range(400)]
    assert draws == [method.on_policy(_stub_ctx(step, None)) for step in range(400)]
    assert 0.22 < sum(draws) / len(draws) < 0.38
    model, batch = gpt2(), prompted_batch()
    assert GKD({"lmbda": 0.0}).prepare_batch(batch, _stub_ctx(0, model)) is batch
    generated = GKD({"lmbda": 1.0, "max_new_tokens": 3}).prepare_batch(batch, _stub_ctx(0, model))
    assert generated.labels.ne(-100).sum() == 3 * 3
    with pytest.raises(ValueError, match="lmbda"):
        GKD({"lmbda": 1.5})


@pytest.fixture(scope="module")
def lm_teacher(tmp_path_factory):
    """A two-layer byte-level GPT-2 trained for one epoch on the text."""
    out = tmp_path_factory.mktemp("lm-teacher")
    config = text_config(out, method={"name": "supervised"}, student=gpt2_spec(layers=2, width=48))
    kdcore.Distiller(config).fit()
    return gpt2_spec(layers=2, width=48, checkpoint=str(out / "student.pt"))


GENERATE = {"max_new_tokens": 6, "eos_token_id": 10}


@pytest.mark.parametrize("method, learned", [
    ({"name": "seq_kd", **GENERATE, "kd_weight": 0.5}, "teacher_agreement"),
    ({"name": "seq_kd", **GENERATE, "num_beams": 2}, "teacher_agreement"),
    ({"name": "gkd", **GENERATE, "lmbda": 0.5}, "perplexity"),
    ({"name": "gkd", **GENERATE, "lmbda": 0.5, "seq_kd": True, "divergence": "skew_kl"}, "perplexity"),
    ({"name": "reasoning_kd", **GENERATE, "answer_marker": " ", "answer_weight": 2.0, "kd_weight": 0.5},
     "teacher_agreement"),
    ({"name": "reasoning_kd", "source": "data", "answer_marker": "e", "rationale_weight": 0.5}, "perplexity"),
], ids=lambda m: "-".join(str(v) for k, v in m.items() if k not in GENERATE) if isinstance(m, dict) else m)
def test_generation_methods_train_end_to_end(tmp_path, lm_teacher, method, learned):
    """Every step's loss is finite and the student learned from its targets in 11 steps: methods
    trained on the teacher's greedy outputs agree with the teacher's predictions on most held-out
    tokens (an untrained student: about 1 in 256); the others beat chance perplexity (256)."""
    teachers = [] if method.get("source") == "data" else [lm_teacher]
    metrics = kdcore.Distiller(text_config(tmp_path, method=method, teachers=teachers, max_bytes=1600)).fit()
    totals = [e["total"] for e in _events(tmp_path) if e["event"] == "step"]
    assert len(totals) == 11 and all(abs(t) < 1e3 for t in totals)
    if learned == "teacher_agreement":
        assert metrics["teacher_agreement"] > 0.5
    else:
        assert metrics["perplexity"] < 128


def test_fused_logit_distillation_trains_like_the_materialized_one(tmp_path, lm_teacher):
    method = {"name": "llm_kd", "divergence": "jsd", "beta": 0.3, "temperature": 2.0, "ce_weight": 0.5}
    plain = kdcore.Distiller(text_config(tmp_path / "plain", method=method, teachers=[lm_teacher],
                                         max_bytes=1600)).fit()
    fused = kdcore.Distiller(text_config(tmp_path / "fused", method={**method, "fused": True}, teachers=[lm_teacher],
                                         max_bytes=1600)).fit()
    assert fused.keys() == plain.keys()
    for key in plain:
        assert fused[key] == pytest.approx(plain[key], rel=1e-4, abs=1e-5), key


def test_training_from_a_teacher_cache_matches_the_teacher(tmp_path, lm_teacher, capsys):
    """With k = V the cache keeps the whole distribution (in float16): cached_kd trains as
    llm_kd with the teacher running, to float16 precision, and is scored against the held-out
    split's cache as the live teacher scores it."""
    import shutil

    import yaml

    config = text_config(tmp_path / "live", method={"name": "llm_kd"}, teachers=[lm_teacher], max_bytes=1600)
    live = kdcore.Distiller(config).fit()
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump({**config, "data": {**config["data"], "teacher_cache": str(tmp_path / "cache")},
                                    "method": {"name": "cached_kd"}, "output_dir": str(tmp_path / "cached")}))
    # into data.teacher_cache: the train split's cache, and the held-out split's in val/
    assert cli.main(["cache-teacher", str(path), "--k", "256", "--value-dtype", "float16"]) == 0
    assert (tmp_path / "cache" / "val" / "manifest.json").exists()
    cached = kdcore.Distiller(path).fit()
    for key in ("perplexity", "token_accuracy", "nll"):
        assert cached[key] == pytest.approx(live[key], rel=2e-3), key
    # the same student against the live teacher
    against_live = kdcore.Distiller(config).evaluate(tmp_path / "cached" / "student.pt")
    assert cached["teacher_agreement"] == pytest.approx(against_live["teacher_agreement"], abs=2e-3)
    assert cached["kl_to_teacher"] == pytest.approx(against_live["kl_to_teacher"], rel=1e-2)
    with pytest.raises(ValueError, match="temperature 2.0 differs from the cache's 1.0"):
        kdcore.Distiller(path, overrides=["method.temperature=2.0"])
    # a held-out cache of another temperature is refused; without one there is nothing to compare with
    shutil.rmtree(tmp_path / "cache" / "val")
    assert cli.main(["cache-teacher", str(path), "--k", "256", "--split", "val", "--temperature", "2.0"]) == 0
    with pytest.raises(kdcore.ConfigError, match=r"data.teacher_cache: .*val was written from another teacher .*"
                                                 r"\(different temperature\)"):
        kdcore.Distiller(path).evaluate()
    shutil.rmtree(tmp_path / "cache" / "val")
    capsys.readouterr()
    assert "teacher_agreement" not in kdcore.Distiller(path, overrides=[f"output_dir={tmp_path / 'no-val'}"]).fit()
    assert "holds no cache of the held-out split, so the student is not scored against the cached teacher" \
        in capsys.readouterr().out


def test_methods_name_what_they_lack(tmp_path):
    with pytest.raises(ValueError, match="seq_kd needs a teacher"):
        kdcore.Distiller(text_config(tmp_path / "a", method={"name": "seq_kd"})).fit()
    with pytest.raises(ValueError, match="set data.teacher_cache"):
        kdcore.Distiller(text_config(tmp_path / "b", method={"name": "cached_kd"}))
    with pytest.raises(ValueError, match="reasoning_kd: answer_marker"):
        kdcore.Distiller(text_config(tmp_path / "c", method={"name": "reasoning_kd"}))
    with pytest.raises(ValueError, match="max_new_tokens must be a positive int"):
        kdcore.Distiller(text_config(tmp_path / "d", method={"name": "gkd", "max_new_tokens": 0}))
    with pytest.raises(TypeError, match="TinyLM has no generate"):
        kdcore.Distiller(text_config(tmp_path / "e", method={"name": "seq_kd", **GENERATE}, student={
            "model": "tiny_lm", "options": {"vocab_size": 256}}, teachers=[{
                "model": "tiny_lm", "options": {"vocab_size": 256}, "pretrained": True}])).fit()


def _events(path):
    import json

    return [json.loads(line) for line in (path / "metrics.jsonl").read_text().splitlines()]
