"""The teacher-logit cache: what it stores, resuming after an interruption, damage detection,
reading back aligned with shuffled batches, training losses from it, and `kdcore cache-teacher`."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from torch.utils.data import DataLoader

import kdcore
from kdcore import cache
from kdcore.cli import main
from kdcore.engine.data import Batch, call_model
from kdcore_plugins.zoo import TinyLM, synthetic_tokens

VOCAB = 64


@pytest.fixture(scope="module")
def lm():
    torch.manual_seed(1)
    return TinyLM(vocab_size=VOCAB, dim=16).eval()


@pytest.fixture(scope="module")
def tokens():
    return synthetic_tokens(vocab_size=VOCAB, seq_len=12, train_size=50, val_size=4)["train"]


def _write(lm, tokens, path, **options):
    settings = {"k": 8, "model_id": "tiny_lm", "temperature": 2.0, "batch_size": 7, "examples_per_shard": 16}
    return cache.write_teacher_cache(lambda inputs: call_model(lm, inputs), tokens, path, **{**settings, **options})


def test_cache_holds_each_positions_top_k(lm, tokens, tmp_path):
    stored = cache.TeacherCache(_write(lm, tokens, tmp_path / "c"))
    assert len(stored) == len(tokens) and len(stored.shards) == 4  # 16 + 16 + 16 + 2 examples
    assert stored.spec.sequence and stored.spec.index_dtype.itemsize == 1  # 64 ids fit uint8
    for i in (0, 17, 49):
        inputs = Batch.from_collated(torch.utils.data.default_collate([tokens[i]])).inputs
        with torch.no_grad():
            logprobs = torch.log_softmax(call_model(lm, inputs)[0].float() / 2.0, -1)
        values, indices = logprobs.topk(8, dim=-1)
        got_indices, got_values = stored[i]
        assert torch.equal(got_indices, indices)
        assert got_values.dtype == torch.bfloat16
        torch.testing.assert_close(got_values, values.to(torch.bfloat16), rtol=0, atol=0)
    assert stored.bytes_per_position == pytest.approx(8 * (1 + 2) + 4 / 12)
    stored.verify()


def test_interrupted_cache_resumes_without_duplicates_or_gaps(lm, tokens, tmp_path):
    complete = cache.TeacherCache(_write(lm, tokens, tmp_path / "whole"))
    calls = {"n": 0}

    def failing(inputs):
        calls["n"] += 1
        if calls["n"] == 6:  # inside the second shard
            raise RuntimeError("the machine went away")
        return call_model(lm, inputs)

    settings = {"k": 8, "model_id": "tiny_lm", "temperature": 2.0, "batch_size": 7, "examples_per_shard": 16}
    with pytest.raises(RuntimeError, match="went away"):
        cache.write_teacher_cache(failing, tokens, tmp_path / "resumed", **settings)
    with pytest.raises(cache.CacheError, match="incomplete \\(16 of 50 examples\\)"):
        cache.TeacherCache(tmp_path / "resumed")
    resumed = cache.TeacherCache(_write(lm, tokens, tmp_path / "resumed"))
    assert resumed.checksum == complete.checksum
    assert [s["sha256"] for s in resumed.shards] == [s["sha256"] for s in complete.shards]


def test_resuming_with_other_settings_is_refused(lm, tokens, tmp_path):
    _write(lm, tokens, tmp_path / "c")
    with pytest.raises(cache.CacheError, match="k: cached 8, asked 4.*temperature: cached 2.0, asked 1.0"):
        _write(lm, tokens, tmp_path / "c", k=4, temperature=1.0)


def test_damage_is_detected(lm, tokens, tmp_path):
    path = _write(lm, tokens, tmp_path / "c")
    shard = path / "shard-00001.kdc"
    data = bytearray(shard.read_bytes())
    data[100] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(cache.CacheError, match="shard-00001.kdc does not match its checksum"):
        cache.TeacherCache(path).verify()
    shard.write_bytes(bytes(data[:-10]))
    with pytest.raises(cache.CacheError, match="shard-00001.kdc has .* bytes, expected"):
        cache.TeacherCache(path)[20]


def test_bad_requests_raise(lm, tokens, tmp_path):
    with pytest.raises(cache.CacheError, match="k = 65 exceeds the teacher's vocabulary size 64"):
        _write(lm, tokens, tmp_path / "a", k=65)
    with pytest.raises(cache.CacheError, match="value_dtype must be one of"):
        _write(lm, tokens, tmp_path / "b", value_dtype="float8")
    with pytest.raises(cache.CacheError, match="holds no teacher cache"):
        cache.TeacherCache(tmp_path)
    with pytest.raises(cache.CacheError, match="temperature must be a finite number > 0, got inf"):
        _write(lm, tokens, tmp_path / "c", temperature=float("inf"))
    stored = _write(lm, tokens, tmp_path / "c")
    with pytest.raises(cache.CacheError, match="written for another dataset"):
        cache.CachedTeacherDataset(synthetic_tokens(vocab_size=VOCAB, seq_len=12, train_size=10)["train"], stored)


def test_a_teacher_with_nan_outputs_is_not_cached(tokens, tmp_path):
    broken = TinyLM(vocab_size=VOCAB, dim=16).eval()
    with torch.no_grad():
        broken.head.bias[3] = float("nan")
    with pytest.raises(cache.CacheError, match="logits for examples 0 to 15 hold NaN or \\+inf"):
        _write(broken, tokens, tmp_path / "nan", batch_size=16)


def test_shuffled_batches_get_their_own_teacher(lm, tokens, tmp_path):
    dataset = cache.CachedTeacherDataset(tokens, _write(lm, tokens, tmp_path / "c", k=VOCAB, value_dtype="float16"))
    loader = DataLoader(dataset, batch_size=9, shuffle=True, collate_fn=dataset.collate,
                        generator=torch.Generator().manual_seed(3))
    for examples, teacher in loader:
        batch = Batch.from_collated(examples)
        with torch.no_grad():
            logits = call_model(lm, batch.inputs)
        assert teacher.indices.shape == (*logits.shape[:-1], VOCAB)
        # with k = V the cached teacher is the whole distribution: the loss matches the dense one
        student = torch.randn(logits.shape)
        dense = kdcore.kd_loss(student, logits, temperature=2.0, labels=batch.labels)
        for mode in ("tail", "renorm"):
            sparse = kdcore.kd_loss(student, teacher, temperature=2.0, labels=batch.labels, sparse_mode=mode)
            torch.testing.assert_close(sparse, dense, rtol=2e-3, atol=2e-4)


def test_classification_teacher_without_positions(teacher, tmp_path):
    from engine_helpers import DATA

    spec = yaml.safe_load(json.dumps({"teachers": [teacher], "student": teacher, "data": DATA,
                                      "method": {"name": "response_kd"}, "output_dir": str(tmp_path / "run")}))
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(spec))
    out = tmp_path / "cache"
    assert main(["cache-teacher", str(config), "--output", str(out), "--k", "3", "--examples-per-shard", "100"]) == 0
    stored = cache.TeacherCache(out)
    assert not stored.spec.sequence and len(stored) == DATA["options"]["train_size"]
    indices, logprobs = stored[5]
    assert indices.shape == logprobs.shape == (1, 3)
    manifest = json.loads((out / "manifest.json").read_text())
    assert json.loads(manifest["spec"]["model_id"])["checkpoint_sha256"] == cache.file_sha256(teacher["checkpoint"])
    # the same command again finds the cache complete and leaves it as it is
    before = (out / "manifest.json").read_text()
    assert main(["cache-teacher", str(config), "--output", str(out), "--k", "3", "--examples-per-shard", "100"]) == 0
    assert (out / "manifest.json").read_text() == before
    assert main(["cache-teacher", str(config), "--output", str(out), "--k", "5"]) == 2  # a different cache
