"""``kdcore demo``: the shipped digits data, the experiment's mechanics on a short schedule, its
report files, and (slow) the claim the README makes: distillation beats the scratch baseline."""

from __future__ import annotations

import json

import pytest
import torch

from kdcore import cli, demo
from kdcore_plugins.zoo import digits


def test_digits_ship_with_kdcore():
    splits = digits()
    assert (len(splits["train"]), len(splits["val"])) == (1347, 450)
    x, y = splits["val"][:]
    assert x.shape == (450, 64) and 0 <= float(x.min()) and float(x.max()) <= 1
    assert torch.bincount(y, minlength=10).min() >= 44  # every class is held out in proportion
    assert digits(images=True)["train"][0][0].shape == (1, 8, 8)


def test_every_classification_method_is_in_the_demo():
    """Every registered method that trains a classifier has a row named by its registered name."""
    from kdcore.demo.experiment import contenders, families
    from kdcore.plugins import host

    language_only = {"llm_kd", "seq_kd", "gkd", "reasoning_kd", "cached_kd", "cross_tokenizer_kd", "supervised"}
    rows = {c.name: c for c in contenders(32, 3)}
    built_in = {entry.name for entry in host().methods if entry.plugin.startswith("kdcore.")}
    assert set(rows) == built_in - language_only
    assert all(c.method["name"] == c.name and c.family in families(32) for c in rows.values())


def test_short_demo_writes_its_report(tmp_path):
    output = tmp_path / "demo"
    settings = demo.Settings(seeds=(0, 5), epochs=1, student_width=8, output_dir=output,
                             methods=("born_again", "dkd", "byot"))
    text = demo.run(settings, say=lambda line: None)
    results = json.loads((output / "demo.json").read_text())
    names = [row["name"] for row in results["rows"]]
    assert names == ["teacher", "teacher_int8", "teacher_pruned", "scratch", "born_again", "dkd", "teacher_cnn",
                     "scratch_cnn", "byot"]
    rows = {row["name"]: row for row in results["rows"]}
    assert all(len(row["accuracy"]) == 2 and len(row["transfer"]) == 2 and row["parameters"] > 0
               and row["latency_us"] > 0 for row in rows.values())
    assert rows["teacher"]["teacher_agreement"] == [1.0, 1.0]
    assert rows["teacher_pruned"]["parameters"] <= rows["scratch"]["parameters"]
    assert rows["teacher_int8"]["size_kb"] < rows["teacher"]["size_kb"] / 3
    assert rows["byot"]["parameters"] == rows["scratch_cnn"]["parameters"] != rows["scratch"]["parameters"]
    # each judged row is compared with the scratch student of its architecture, seed by seed
    assert {name: row["baseline"] for name, row in rows.items() if row["baseline"]} == {
        "teacher_pruned": "scratch", "born_again": "scratch", "dkd": "scratch", "byot": "scratch_cnn"}
    for name, judged in results["verdicts"].items():
        baseline = rows[rows[name]["baseline"]]
        gains = [a - b for a, b in zip(rows[name]["accuracy"], baseline["accuracy"])]
        assert judged["wins"] == sum(g > 0 for g in gains) and judged["seeds"] == 2
        assert judged["mean_gain_points"] == pytest.approx(100 * sum(gains) / 2)
        assert judged["beat_scratch"] == (judged["mean_gain_points"] > 0 and judged["wins"] == 2)
        assert f"{name}: {judged['text']}" in text
    # the transfer figures of a row are against its seed's teacher, beside that seed's scratch student
    figures = rows["dkd"]["transfer"][1]
    assert figures["inherited_error_rate"] == rows["dkd"]["inherited_error_rate"][1]
    assert figures["baseline_accuracy"] == rows["scratch"]["accuracy"][1]
    assert figures["teacher_accuracy"] == rows["teacher"]["accuracy"][1]
    assert results["settings"]["seeds"] == [0, 5]
    assert all(f"| {name} |" in text for name in names)
    assert (output / "demo.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (output / "seed5" / "born_again" / "stages" / "1-gen2" / "student.pt").exists()


def test_verdicts_need_a_positive_mean_and_most_seeds():
    from kdcore.demo.experiment import Row
    from kdcore.demo.report import verdict

    scratch = Row("scratch", "", "mlp", accuracy=[0.90, 0.90, 0.90])
    one_big_win = Row("m", "", "mlp", "scratch", accuracy=[0.99, 0.89, 0.89])
    assert verdict(one_big_win, scratch) == {"beat_scratch": False, "mean_gain_points": pytest.approx(7 / 3), "wins": 1,
                                             "seeds": 3, "text": "did not beat scratch (+2.3 points; better on 1/3 "
                                                                 "seeds)"}
    small_wins = Row("m", "", "mlp", "scratch", accuracy=[0.91, 0.91, 0.80])
    assert not verdict(small_wins, scratch)["beat_scratch"]  # most seeds, but a negative mean
    assert verdict(Row("m", "", "mlp", "scratch", accuracy=[0.91, 0.91, 0.90]), scratch)["beat_scratch"]


def test_capacity_sweep_writes_its_report(tmp_path):
    from kdcore.demo import capacity

    settings = demo.Settings(seeds=(0, 1), epochs=1, output_dir=tmp_path / "capacity")
    results = capacity.run(settings, say=lambda line: None, widths=(4, 16))
    written = json.loads((tmp_path / "capacity" / "capacity.json").read_text())
    assert written["points"] == results["points"] and [p["width"] for p in written["points"]] == [4, 16]
    point = written["points"][0]
    assert point["parameters"] == 64 * 4 + 4 + 4 * 10 + 10 and 4 < point["assistant_width"] < 256
    assert all(len(point[method]) == 2 for method in capacity.METHODS)
    gains = [a - b for a, b in zip(point["takd"], point["response_kd"])]
    assert point["gains"]["takd_over_response_kd"]["mean_gain_points"] == pytest.approx(100 * sum(gains) / 2)
    assert written["teacher"]["parameters"] == 85_002
    text = capacity.summary(results)
    assert "| 64-4-10 | 310 |" in text and "| 64-16-10 | 1,210 |" in text
    assert (tmp_path / "capacity" / "capacity.png").read_bytes()[:4] == b"\x89PNG"


def test_assistants_lie_between_student_and_teacher():
    from kdcore.demo.capacity import TEACHER_HIDDEN, WIDTHS, assistant_width, mlp_parameters

    teacher = mlp_parameters(TEACHER_HIDDEN)
    assert WIDTHS[0] <= 32 // 8 and mlp_parameters([WIDTHS[-1]]) > 0.85 * teacher and len(WIDTHS) >= 5
    for width in WIDTHS[:-1]:
        student, assistant = mlp_parameters([width]), mlp_parameters([assistant_width(width)])
        assert student < assistant < teacher
        assert assistant == pytest.approx((student * teacher) ** 0.5, rel=0.05)


def test_demo_never_replaces_what_it_did_not_write(tmp_path, capsys):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.tex").write_text("mine")
    (mine / "demo.json").write_text('{"my": "config"}')  # a file of that name that no demo wrote
    assert cli.main(["demo", "--output-dir", str(mine)]) == 2
    assert "exists and was not written by `kdcore demo`" in capsys.readouterr().err
    assert cli.main(["demo", "--sweep", "capacity", "--output-dir", str(mine)]) == 2
    assert "exists and was not written by `kdcore demo`" in capsys.readouterr().err
    assert sorted(p.name for p in mine.iterdir()) == [".demo.lock", "demo.json", "thesis.tex"]
    assert (mine / "demo.json").read_text() == '{"my": "config"}'


def test_a_rerun_replaces_only_its_own_results(tmp_path, capsys):
    output = tmp_path / "demo"
    arguments = ["demo", "--seeds", "1", "--epochs", "1", "--methods", "response_kd", "--output-dir", str(output)]
    assert cli.main(arguments) == 0
    (output / "notes.txt").write_text("kept")
    (output / "seed0" / "stale").mkdir()
    assert cli.main([*arguments[:2], "4,5", *arguments[3:]]) == 0
    assert (output / "notes.txt").read_text() == "kept" and not (output / "seed0").exists()
    assert (output / "seed4" / "response_kd" / "student.pt").exists()
    assert json.loads((output / "demo.json").read_text())["kind"] == "demo"
    # the other kind of demo results is not replaced either, and the message says whose they are
    assert cli.main(["demo", "--sweep", "capacity", "--output-dir", str(output)]) == 2
    assert capsys.readouterr().err.endswith("holds the results of `kdcore demo`, not of `kdcore demo --sweep "
                                            "capacity`; choose another --output-dir\n")


def test_one_demo_at_a_time_in_a_directory(tmp_path, capsys):
    from kdcore.demo.directory import claim

    with claim(tmp_path / "demo", "demo"):
        assert cli.main(["demo", "--seeds", "1", "--output-dir", str(tmp_path / "demo")]) == 2
    assert "another kdcore demo is writing to it" in capsys.readouterr().err
    (tmp_path / "file").write_text("")
    assert cli.main(["demo", "--output-dir", str(tmp_path / "file" / "demo")]) == 2
    assert "cannot create or write it" in capsys.readouterr().err


@pytest.mark.parametrize("arguments, message", [
    (["--seeds", "0"], "--seeds must be a count from 1 to 100, got 0"),
    (["--seeds", "1000000000"], "--seeds must be a count from 1 to 100, got 1000000000"),
    (["--seeds", "7,x"], "--seeds takes a count or a comma list of seeds, integers from 0 (e.g. 3 or 7,8,9), got '7,x'"),
    (["--seeds", "7,7"], "--seeds lists a seed twice: '7,7' (paired seeds must be distinct)"),
    (["--seeds", "99999999999999999999,1"], "--seeds: 99999999999999999999 is not below 2**32"),
    (["--methods", "response_kd,fitnet"], "--methods: the demo has no method named fitnet; it runs response_kd, "),
    (["--methods", "response_kd,"], "--methods takes a comma list of method names (e.g. response_kd,dkd), got "),
    (["--methods", "dkd", "--sweep", "capacity"], "--methods and --student-width belong to the method comparison"),
    (["--student-width", "8", "--sweep", "capacity"], "--sweep capacity trains its own students"),
    (["--epochs", "0"], "--epochs must be at least 1, got 0"),
])
def test_bad_demo_arguments_are_one_line_errors(tmp_path, capsys, arguments, message):
    assert cli.main(["demo", *arguments, "--output-dir", str(tmp_path / "demo")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err, err
    assert not (tmp_path / "demo").exists()


def test_seeds_are_a_count_or_a_list(tmp_path, capsys):
    assert cli.main(["demo", "--seeds", "7,3", "--epochs", "1", "--methods", "response_kd",
                     "--output-dir", str(tmp_path / "demo")]) == 0
    results = json.loads((tmp_path / "demo" / "demo.json").read_text())
    assert results["settings"]["seeds"] == [7, 3] and results["settings"]["methods"] == ["response_kd"]
    assert (tmp_path / "demo" / "seed7" / "response_kd" / "student.pt").exists()
    assert "mean ± std over seeds 7, 3" in capsys.readouterr().out


@pytest.mark.slow
def test_the_demo_as_the_readme_reports_it(tmp_path):
    """The default demo: the methods the README says beat scratch do, on every seed."""
    demo.run(demo.Settings(output_dir=tmp_path / "demo"), say=lambda line: None)
    verdicts = json.loads((tmp_path / "demo" / "demo.json").read_text())["verdicts"]
    for name in ("response_kd", "born_again", "ensemble", "takd", "dkd", "fitnets"):
        assert verdicts[name]["beat_scratch"] and verdicts[name]["wins"] == 3, (name, verdicts[name])
    assert not verdicts["teacher_pruned"]["beat_scratch"]


@pytest.mark.slow
def test_the_capacity_sweep_as_the_readme_reports_it(tmp_path):
    """response_kd beats scratch on every seed from the demo's width up; at the smallest width it
    does not (the capacity gap)."""
    from kdcore.demo import capacity

    results = capacity.run(demo.Settings(output_dir=tmp_path / "capacity"), say=lambda line: None)
    gains = {point["width"]: point["gains"]["response_kd"] for point in results["points"]}
    assert all(gains[width]["wins"] == 3 and gains[width]["mean_gain_points"] > 0 for width in (32, 64, 256, 1024))
    assert gains[4]["wins"] < 2
