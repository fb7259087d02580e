"""The Hugging Face integration on tiny causal LMs built from configs (offline): the loss against a
hand-written formula, masked prompt/padding tokens, fused = materialized, different vocabularies,
sparse (cached) teachers, and KDTrainer's gradient accumulation and evaluation."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

transformers = pytest.importorskip("transformers")

import kdcore  # noqa: E402
from kdcore.integrations.transformers import KDTrainer, causal_lm_kd_loss  # noqa: E402


def gpt2(vocab=64, layers=1, seed=0):
    torch.manual_seed(seed)
    config = transformers.GPT2Config(vocab_size=vocab, n_positions=32, n_embd=32, n_layer=layers, n_head=2,
                                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=None,
                                     eos_token_id=None)
    return transformers.GPT2LMHeadModel(config).double().eval()


def llama(vocab=72, seed=1):
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32)
    return transformers.LlamaForCausalLM(config).double().eval()


def batch(vocab=64, size=3, length=10, seed=2):
    """Prompts of 3 tokens (label -100) and the last two positions of row 1 padded."""
    g = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(vocab, (size, length), generator=g)
    attention_mask = torch.ones(size, length, dtype=torch.long)
    attention_mask[1, -2:] = 0
    labels = input_ids.clone()
    labels[:, :3] = -100
    labels[attention_mask == 0] = -100
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def test_loss_is_the_formula_over_counted_tokens_only():
    student, teacher, data = gpt2(), gpt2(layers=2, seed=5), batch()
    loss = causal_lm_kd_loss(student, teacher, data, divergence="forward_kl", temperature=2.0, ce_weight=0.3,
                             kd_weight=0.7)
    s = student(input_ids=data["input_ids"], attention_mask=data["attention_mask"]).logits[:, :-1]
    with torch.no_grad():
        t = teacher(input_ids=data["input_ids"], attention_mask=data["attention_mask"]).logits[:, :-1]
    target = data["labels"][:, 1:]
    counted = target != -100
    s, t, target = s[counted], t[counted], target[counted]
    kl = (F.softmax(t / 2, -1) * (F.log_softmax(t / 2, -1) - F.log_softmax(s / 2, -1))).sum(-1)
    expected = (0.7 * 4 * kl + 0.3 * F.cross_entropy(s, target, reduction="none")).mean()
    torch.testing.assert_close(loss, expected)


def test_prompt_and_padding_tokens_contribute_nothing():
    student, teacher, data = gpt2(), gpt2(seed=5), batch()
    loss = causal_lm_kd_loss(student, teacher, data, temperature=2.0, ce_weight=0.5)
    (grad,) = torch.autograd.grad(loss, [student.lm_head.weight])
    # change what sits on ignored positions' targets: the loss and gradient stay the same
    changed = {**data, "labels": data["labels"].clone()}
    changed["labels"][:, :3] = -100  # already ignored; now also with different ids behind the mask
    changed["input_ids"] = data["input_ids"].clone()
    changed["input_ids"][1, -2:] = (data["input_ids"][1, -2:] + 7) % 64  # padding tokens, masked out
    again = causal_lm_kd_loss(student, teacher, changed, temperature=2.0, ce_weight=0.5)
    (grad_again,) = torch.autograd.grad(again, [student.lm_head.weight])
    torch.testing.assert_close(again, loss)
    torch.testing.assert_close(grad_again, grad)


@pytest.mark.parametrize("divergence", ["forward_kl", "jsd", "skew_kl"])
def test_fused_equals_materialized(divergence):
    student, teacher, data = gpt2(), gpt2(layers=2, seed=5), batch()
    options = dict(divergence=divergence, temperature=1.5, ce_weight=0.2)
    fused = causal_lm_kd_loss(student, teacher, data, fused=True, **options)
    plain = causal_lm_kd_loss(student, teacher, data, **options)
    torch.testing.assert_close(fused, plain)
    params = [p for p in student.parameters() if p.requires_grad]
    for a, b in zip(torch.autograd.grad(fused, params), torch.autograd.grad(plain, params)):
        torch.testing.assert_close(a, b)


def test_vocabularies_of_different_sizes():
    student, teacher, data = gpt2(vocab=64), llama(vocab=72), batch(vocab=64)
    with pytest.raises(ValueError, match="pass vocab_size=64"):
        causal_lm_kd_loss(student, teacher, data)
    plain = causal_lm_kd_loss(student, teacher, data, vocab_size=64, divergence="reverse_kl")
    fused = causal_lm_kd_loss(student, teacher, data, vocab_size=64, divergence="reverse_kl", fused=True)
    torch.testing.assert_close(fused, plain)


@pytest.mark.parametrize("fused", [False, True])
def test_sparse_teacher_from_a_cache(fused):
    student, teacher, data = gpt2(), gpt2(seed=5), batch()
    with torch.no_grad():
        logits = teacher(input_ids=data["input_ids"], attention_mask=data["attention_mask"]).logits[:, :-1]
    logprobs, indices = torch.log_softmax(logits, -1).topk(16, dim=-1)
    sparse = kdcore.SparseTeacher(indices, logprobs)
    loss = causal_lm_kd_loss(student, sparse, data, fused=fused, sparse_mode="tail")
    s = student(input_ids=data["input_ids"], attention_mask=data["attention_mask"]).logits[:, :-1]
    expected = kdcore.kd_loss(s, sparse, labels=data["labels"][:, 1:], sparse_mode="tail")
    torch.testing.assert_close(loss, expected)
    with pytest.raises(ValueError, match="one row per predicting position"):
        causal_lm_kd_loss(student, kdcore.SparseTeacher(indices[:, :-1], logprobs[:, :-1]), data)


class FreshLogitsSized(TorchDispatchMode):
    """Records the ops that allocate a tensor of at least ``numel`` elements (one not sharing its
    storage with an input): a copy of the logits shows up as one."""

    def __init__(self, numel):
        super().__init__()
        self.numel, self.ops = numel, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        tensors = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
        inputs = {t.untyped_storage().data_ptr() for t in tensors}
        self.ops += [str(func) for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)
                     and t.numel() >= self.numel and t.untyped_storage().data_ptr() not in inputs]
        return out


COPIES = ("aten.clone", "aten.copy", "aten._to_copy", "aten.slice_backward", "aten.cat", "aten.constant_pad_nd")


@pytest.mark.parametrize("sparse", [False, True])
def test_the_labels_shift_and_the_logits_are_not_copied(sparse):
    """The loss of the shifted labels over the whole logits is the loss of the logits cut to the
    predicting positions (the gradients bit for bit, the loss to float32 rounding: its sum groups
    the rows differently), and forward and backward make no logits-sized copy, which cutting them
    makes (the slice cannot be flattened to rows as a view, and its gradient is scattered back)."""
    student, teacher = gpt2(vocab=512).float(), gpt2(vocab=512, layers=2, seed=5).float()
    data = batch(vocab=512, size=4, length=24)
    options = dict(divergence="jsd", temperature=2.0, ce_weight=0.3)
    with torch.no_grad():
        t_logits = teacher(input_ids=data["input_ids"], attention_mask=data["attention_mask"]).logits[:, :-1]
    logprobs, indices = torch.log_softmax(t_logits, -1).topk(16, dim=-1)
    given = kdcore.SparseTeacher(indices, logprobs) if sparse else teacher

    def old():
        s = student(input_ids=data["input_ids"], attention_mask=data["attention_mask"]).logits[:, :-1]
        return kdcore.kd_loss(s, given if sparse else t_logits, labels=data["labels"][:, 1:], **options)

    params = [p for p in student.parameters() if p.requires_grad]
    numel = 4 * 23 * 512
    copies = {}
    for name, loss_of in (("new", lambda: causal_lm_kd_loss(student, given, data, **options)), ("old", old)):
        with FreshLogitsSized(numel) as seen:
            loss = loss_of()
            grads = torch.autograd.grad(loss, params)
        copies[name] = [op for op in seen.ops if op.startswith(COPIES)]
        if name == "new":
            new_loss, new_grads = loss, grads
    torch.testing.assert_close(new_loss, loss, rtol=1e-6, atol=0)
    assert all(torch.equal(a, b) for a, b in zip(new_grads, grads))
    assert copies["new"] == []
    assert copies["old"]  # the check sees the copies the slice makes


def test_bad_calls_are_named():
    student, teacher, data = gpt2(), gpt2(seed=5), batch()
    with pytest.raises(ValueError, match=r"teacher is in training mode .* teacher.eval\(\)"):
        causal_lm_kd_loss(student, teacher.train(), data)
    teacher.eval()
    with pytest.raises(TypeError, match=r"unknown option\(s\) \['temprature'\]"):
        causal_lm_kd_loss(student, teacher, data, temprature=2.0)
    with pytest.raises(ValueError, match="needs input_ids and labels"):
        causal_lm_kd_loss(student, teacher, {"input_ids": data["input_ids"]})


def test_models_that_transform_their_logits_are_not_fused():
    """Gemma 2 soft-caps its logits, so they are not its LM head applied to the hidden states."""
    torch.manual_seed(0)
    config = transformers.Gemma2Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                       num_attention_heads=2, num_key_value_heads=1, head_dim=16,
                                       max_position_embeddings=32, final_logit_softcapping=2.0)
    capped = transformers.Gemma2ForCausalLM(config).double().eval()
    with pytest.raises(ValueError, match="Gemma2ForCausalLM's logits are not its LM head applied .* use fused=False"):
        causal_lm_kd_loss(capped, gpt2(), batch(), fused=True)
    assert torch.isfinite(causal_lm_kd_loss(capped, gpt2(), batch()))


class _Rows(torch.utils.data.Dataset):
    def __init__(self, data):
        self.data = data

    def __len__(self):
        return len(self.data["input_ids"])

    def __getitem__(self, i):
        return {key: value[i] for key, value in self.data.items()}


def _trained_head(tmp_path, batch_size, accumulation):
    student, teacher = gpt2().float(), gpt2(layers=2, seed=5).float()
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path / f"run{batch_size}"), per_device_train_batch_size=batch_size,
        gradient_accumulation_steps=accumulation, max_steps=1, learning_rate=0.5, optim="sgd",
        lr_scheduler_type="constant", report_to=[], use_cpu=True, save_strategy="no", seed=0,
        dataloader_drop_last=True)
    trainer = KDTrainer(model=student, args=args, train_dataset=_Rows(batch(size=4, seed=9)), teacher=teacher,
                        kd_options={"temperature": 2.0, "ce_weight": 0.5, "divergence": "jsd"})
    trainer.train()
    return student.lm_head.weight.detach().clone()


def test_trainer_accumulation_matches_the_full_batch(tmp_path):
    """Rows with different numbers of counted tokens: two accumulated halves must give the same step
    as the whole batch (the loss divides by the step's token count, not per micro-batch)."""
    full = _trained_head(tmp_path, batch_size=4, accumulation=1)
    halves = _trained_head(tmp_path, batch_size=2, accumulation=2)
    before = gpt2().float().lm_head.weight.detach()
    assert not torch.allclose(full, before)  # it trained
    torch.testing.assert_close(halves, full, rtol=1e-4, atol=1e-6)


def test_trainer_evaluates_the_distillation_loss(tmp_path):
    """evaluate() reports the loss over the evaluation batch's counted tokens (the loss hands
    Trainer's evaluation no logits)."""
    student, teacher, data = gpt2().float(), gpt2(layers=2, seed=5).float(), batch(size=4, seed=9)
    options = {"temperature": 2.0, "ce_weight": 0.5, "divergence": "jsd"}
    args = transformers.TrainingArguments(output_dir=str(tmp_path), per_device_eval_batch_size=4, report_to=[],
                                          use_cpu=True)
    trainer = KDTrainer(model=student, args=args, eval_dataset=_Rows(data), teacher=teacher, kd_options=options)
    expected = causal_lm_kd_loss(student, teacher, data, **options)
    assert trainer.evaluate()["eval_loss"] == pytest.approx(expected.item(), rel=1e-5)


def test_distiller_trains_hugging_face_models_from_a_config(tmp_path):
    """hf_causal_lm in run configs: a GPT-2 teacher trained on labels, then response KD into a
    smaller GPT-2 student, on the synthetic token chain (the engine's loss path, checkpoints)."""
    from engine_helpers import lm_config

    def model(layers):
        return {"model": "hf_causal_lm", "options": {"model_type": "gpt2", "vocab_size": 64, "n_positions": 32,
                                                     "n_embd": 16, "n_layer": layers, "n_head": 2,
                                                     "bos_token_id": None, "eos_token_id": None}}

    teacher_run = lm_config(tmp_path / "teacher", method={"name": "supervised"}, student=model(2),
                            training={"epochs": 2})
    teacher_metrics = kdcore.Distiller(teacher_run).fit()
    student_run = lm_config(tmp_path / "student", method={"name": "response_kd", "temperature": 2.0},
                            student=model(1),
                            teachers=[{**model(2), "checkpoint": str(tmp_path / "teacher" / "student.pt")}],
                            training={"epochs": 2})
    metrics = kdcore.Distiller(student_run).fit()
    assert teacher_metrics["perplexity"] < 64 and metrics["perplexity"] < 64  # below chance on 64 tokens
    assert 0 < metrics["teacher_agreement"] <= 1
    with pytest.raises(TypeError, match="exactly one of model_type"):
        kdcore.integrations.transformers.causal_lm()
