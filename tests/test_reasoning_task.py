"""The ``addition`` task (its two views, determinism, the carry steps, the held-out splits, the
prompt masking reasoning_kd and generation rely on), its answer parser, and the reasoning
experiment: its mechanics on a tiny plan and (slow) what the README reports of it."""

from __future__ import annotations

import json
import random
import re
from types import SimpleNamespace

import pytest
import torch

from kdcore.engine.builders import build_splits
from kdcore.engine.config import ConfigError, DataSpec
from kdcore_plugins.addition import ANSWER_MARKER, END, addition, parse_answer, prompt, rationale_of, target, width_of
from kdcore_plugins.reasoning_kd import answer_mask, marker_ids

SMALL = {"train_size": 200, "val_size": 40, "long_size": 30}


def lines(split) -> list[str]:
    """Each item of a split as text: its input bytes and the last label (the line's last byte)."""
    texts = []
    for i in range(len(split)):
        item = split[i]
        ids, labels = item["input_ids"].tolist(), item["labels"].tolist()
        last = max(j for j, label in enumerate(labels) if label != -100)
        texts.append(bytes(ids[:last + 1] + [labels[last]]).decode())
    return texts


def test_the_two_views_write_the_same_problems():
    assert prompt(47, 85) + target(47, 85, True) == "47+85=7+5+0=12;4+8+1=13;A:132\n"
    assert prompt(47, 85) + target(47, 85, False) == "47+85=A:132\n"
    assert prompt(5, 998) + target(5, 998, True) == "005+998=5+8+0=13;0+9+1=10;0+9+1=10;A:1003\n"
    with_steps, answers = addition(**SMALL), addition(**SMALL, rationale=False)
    for split in ("train", "val", "long"):
        assert with_steps[split].problems == answers[split].problems
        assert lines(with_steps[split]) == [prompt(a, b) + target(a, b, True) for a, b in with_steps[split].problems]
        assert lines(answers[split]) == [prompt(a, b) + target(a, b, False) for a, b in answers[split].problems]


def test_problems_depend_only_on_the_seed():
    first, again, other = addition(**SMALL, seed=3), addition(**SMALL, seed=3), addition(**SMALL, seed=4)
    for split in ("train", "val", "long"):
        assert first[split].problems == again[split].problems
        assert torch.equal(first[split].input_ids, again[split].input_ids)
        assert torch.equal(first[split].labels, again[split].labels)
    assert first["train"].problems != other["train"].problems


def test_the_carry_steps_add_up_for_random_problems():
    """Each step holds its column's digits, the carry in and their sum; the answer is the last
    carry and the sums' units digits, from the highest column down, as a number."""
    rng = random.Random(0)
    for _ in range(500):
        a, b = rng.randrange(10 ** rng.randint(1, 7)), rng.randrange(10 ** rng.randint(1, 7))
        text = rationale_of(a, b)
        assert re.fullmatch(r"(\d\+\d\+[01]=\d\d;)+", text), text
        steps = re.findall(r"(\d)\+(\d)\+(\d)=(\d\d);", text)
        assert len(steps) == width_of(a, b) == max(len(str(a)), len(str(b)))
        carry, written = 0, ""
        for column, (x, y, carry_in, total) in enumerate(steps):
            assert (int(x), int(y)) == (a // 10 ** column % 10, b // 10 ** column % 10)
            assert int(carry_in) == carry and int(total) == int(x) + int(y) + carry
            carry, written = int(total) // 10, total[1] + written
        assert target(a, b, True) == f"{text}{ANSWER_MARKER}{int(str(carry) + written)}{END}"
        assert parse_answer(target(a, b, True)) == a + b


def test_held_out_problems_are_new_and_the_longer_ones_longer():
    splits = addition(**SMALL, columns=(1, 3), long_columns=(4, 5))
    widths = {split: {width_of(a, b) for a, b in splits[split].problems} for split in splits}
    assert widths["train"] == widths["val"] == {1, 2, 3} and widths["long"] == {4, 5}
    # the longer operand sets the width, the other may be shorter (written with leading zeros)
    assert any(len(str(min(a, b))) < width_of(a, b) for a, b in splits["long"].problems)
    train = set(splits["train"].problems)
    assert not train & set(splits["val"].problems) and not train & set(splits["long"].problems)
    assert all(len(set(splits[split].problems)) == len(splits[split]) for split in splits)
    assert [len(splits[split]) for split in ("train", "val", "long")] == [200, 40, 30]


@pytest.mark.parametrize("with_rationale", [True, False])
def test_labels_are_the_next_bytes_after_the_prompt_only(with_rationale):
    split = addition(**SMALL, rationale=with_rationale)["train"]
    for i, (a, b) in enumerate(split.problems):
        ids, labels = split[i]["input_ids"], split[i]["labels"]
        line = (prompt(a, b) + target(a, b, with_rationale)).encode()
        start = len(prompt(a, b)) - 1  # predicts the first byte after the prompt
        assert bytes(ids[:len(line) - 1].tolist()) == line[:-1]
        assert bytes(labels[start:len(line) - 1].tolist()) == line[len(prompt(a, b)):]
        assert (labels[:start] == -100).all() and (labels[len(line) - 1:] == -100).all()
        assert (ids[len(line) - 1:] == ord(END)).all()


def test_reasoning_kd_splits_the_targets_at_the_marker():
    """On the dataset's labels, reasoning_kd's answer term covers the marker, the answer and the
    end of the line; its rationale term the steps before them; an answer-only line is all answer."""
    marker = torch.tensor(marker_ids(ANSWER_MARKER))
    for with_rationale in (True, False):
        split = addition(**SMALL, rationale=with_rationale)["val"]
        answer = answer_mask(split.labels, marker, -100)
        for labels, kept, (a, b) in zip(split.labels, answer, split.problems):
            assert bytes(labels[kept].tolist()).decode() == f"{ANSWER_MARKER}{a + b}{END}"
            steps = bytes(labels[(labels != -100) & ~kept].tolist()).decode()
            assert steps == (rationale_of(a, b) if with_rationale else "")


def test_the_answer_parser():
    assert parse_answer("7+5+0=12;4+8+1=13;A:132\n") == 132
    assert parse_answer("A:132") == parse_answer("A:132\nA:7") == parse_answer("A:0132\n\n") == 132
    for text in ("132\n", "A:\n", "A:13x2\n", "A:-1\n", "A: 132\n", "A:1\u00b2\n", ""):
        assert parse_answer(text) is None, text


def test_the_dataset_is_registered_and_checks_its_options():
    train, val = build_splits(DataSpec(dataset="addition", options={**SMALL, "rationale": False}))
    assert (len(train), len(val)) == (200, 40)
    for options, message in (
            ({"columns": [0, 2]}, "addition: columns must be"), ({"columns": [3, 2]}, "addition: columns must be"),
            ({"long_columns": [3, 4]}, "addition: long_columns must start above"),
            ({"train_size": 0}, "addition: train_size must be a positive int"),
            ({"columns": [1, 1], "train_size": 200}, "addition: train_size asks for more distinct problems")):
        with pytest.raises(ConfigError, match=message):
            build_splits(DataSpec(dataset="addition", options={**SMALL, **options}))


def test_a_tiny_reasoning_experiment_reports_every_row(tmp_path):
    pytest.importorskip("transformers")
    from kdcore.demo import reasoning

    plan = reasoning.Plan(train_size=64, held_out_size=8, epochs=1, batch_size=32, teacher_width=16, student_width=8)
    said = []
    results = reasoning.run(SimpleNamespace(seeds=(0, 3), output_dir=tmp_path), say=said.append, plan=plan)
    assert json.loads((tmp_path / "reasoning" / "reasoning.json").read_text()) == results
    rows = results["rows"]
    assert list(rows) == ["teacher", "answer_only", "rationale_data", "rationale_teacher"]
    assert rows["teacher"]["parameters"] > rows["answer_only"]["parameters"] == rows["rationale_data"]["parameters"]
    for row in rows.values():
        assert set(row["accuracy"]) == {"in_distribution", "longer"}
        assert all(len(values) == 2 and all(0 <= v <= 1 for v in values) for values in row["accuracy"].values())
    for split, judged in results["verdicts"].items():
        assert set(judged) == {"rationale_data", "rationale_teacher"}
        for name, verdict in judged.items():
            gains = [a - b for a, b in zip(rows[name]["accuracy"][split], rows["answer_only"]["accuracy"][split])]
            assert verdict["wins"] == sum(g > 0 for g in gains) and verdict["seeds"] == 2
            assert verdict["mean_gain_points"] == pytest.approx(50 * sum(gains))
            assert verdict["beat_scratch"] == (verdict["mean_gain_points"] > 0 and verdict["wins"] == 2)
            assert f"{name}, {split.replace('_', '-')}: {verdict['text']}" in results["text"]
    assert results["task"]["example"] == "47+85=7+5+0=12;4+8+1=13;A:132" and results["seeds"] == [0, 3]
    assert (tmp_path / "reasoning" / "seed3" / "rationale_teacher" / "student.pt").exists()
    assert any("seed 3  rationale_teacher" in line for line in said)


@pytest.mark.slow
def test_the_reasoning_experiment_as_the_readme_reports_it(tmp_path):
    """The default experiment: both rationale students beat the answer-only student on held-out
    problems of the trained widths, on every seed; on wider problems every model, the teacher
    included, gets almost nothing right."""
    pytest.importorskip("transformers")
    from kdcore import demo
    from kdcore.demo import reasoning

    results = reasoning.run(demo.Settings(seeds=(0, 1), output_dir=tmp_path), say=lambda line: None)
    rows, verdicts = results["rows"], results["verdicts"]
    assert min(rows["teacher"]["accuracy"]["in_distribution"]) > 0.95
    for name in ("rationale_data", "rationale_teacher"):
        assert verdicts["in_distribution"][name]["beat_scratch"] and verdicts["in_distribution"][name]["wins"] == 2
        assert min(rows[name]["accuracy"]["in_distribution"]) > 0.85
    assert all(value < 0.01 for row in rows.values() for value in row["accuracy"]["longer"])
