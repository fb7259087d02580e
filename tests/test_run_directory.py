"""A run's output directory: one run at a time, never overwritten, a checkpoint that survives a bad
write, failures before the first step rather than after; the fault cases a user meets (a busy
directory, a deleted, corrupt or replaced file, a short log, a read-only directory, a kill midway)."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import pytest
import torch
import yaml

import kdcore
from engine_helpers import FEATURES, classification_config, mlp
from kdcore import cli
from kdcore.engine import rundir
from kdcore.engine.rundir import RunDirectory, RunDirectoryError


def config_for(directory: Path, teacher, **sections):
    return classification_config(directory, method={"name": "response_kd"}, teachers=[teacher],
                                 training={"epochs": 2, "log_every": 1}, **sections)


class AtStep:
    """A callback that calls ``action`` once, at the end of optimizer step ``step``."""

    def __init__(self, step, action):
        self.step, self.action, self.result = step, action, None

    @kdcore.hookimpl
    def kdcore_step_end(self, step):
        if step == self.step:
            self.result = self.action()


def run_files(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


# -- one run at a time -----------------------------------------------------------------------------


def test_a_second_run_or_resume_into_a_busy_directory_stops_at_once(tmp_path, teacher, capsys):
    config = config_for(tmp_path / "run", teacher)
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(config))

    def intrude():
        fresh = cli.main(["distill", str(path)])
        fresh_err = capsys.readouterr().err
        resumed = cli.main(["distill", str(path), "--resume"])
        return fresh, fresh_err, resumed, capsys.readouterr().err

    callback = AtStep(3, intrude)
    kdcore.Distiller(config, callbacks=[callback], console=False).fit()
    fresh, fresh_err, resumed, resumed_err = callback.result
    holder = f"pid {os.getpid()} on host "
    assert fresh == 2 and resumed == 2
    for err in (fresh_err, resumed_err):
        assert f"is in use by another run ({holder}" in err and "choose another output_dir" in err
    events = [json.loads(line)["event"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert events.count("run_end") == 1 and events.count("teacher_eval") == 1  # nothing of the intruders
    assert (tmp_path / "run" / ".lock").read_text() == ""  # released: nobody holds it


def test_a_dead_runs_lock_is_taken_over(tmp_path, teacher, capsys):
    directory = tmp_path / "run"
    directory.mkdir()
    (directory / ".lock").write_text(json.dumps({"pid": 999999, "host": "elsewhere", "started": "yesterday"}))
    kdcore.Distiller(config_for(directory, teacher)).fit()
    assert (f"took over the lock of {directory}: its holder (pid 999999 on host elsewhere, started yesterday) "
            "ended without releasing it") in capsys.readouterr().out


def test_takeover_message_names_the_dead_holder(tmp_path):
    directory = tmp_path / "run"
    directory.mkdir()
    (directory / ".lock").write_text(json.dumps({"pid": 999999, "host": "elsewhere", "started": "yesterday"}))
    with RunDirectory(directory) as run:
        note = run.acquire()
        assert "its holder (pid 999999 on host elsewhere, started yesterday) ended without releasing it" in note
        assert json.loads((directory / ".lock").read_text())["pid"] == os.getpid()
    assert RunDirectory(directory).acquire() is None  # a released lock is no one's


def test_the_lock_is_held_by_the_kernel_not_the_file(tmp_path):
    first = RunDirectory(tmp_path)
    first.acquire()
    with pytest.raises(RunDirectoryError, match=f"in use by another run \\(pid {os.getpid()} on host"):
        RunDirectory(tmp_path).acquire()
    first.release()
    second = RunDirectory(tmp_path)
    assert second.acquire() is None
    second.release()


def test_a_busy_message_names_the_new_holder_not_the_dead_one(tmp_path):
    """The holder writes its record just after taking the lock; a run refused in that moment
    names it, not the killed run whose record is still there."""
    import subprocess
    import threading
    dead = subprocess.Popen(["true"])
    dead.wait()
    (tmp_path / ".lock").write_text(json.dumps({"pid": dead.pid, "host": rundir.socket.gethostname(),
                                                "started": "earlier"}))
    handle = os.open(tmp_path / ".lock", os.O_RDWR)
    rundir.fcntl.flock(handle, rundir.fcntl.LOCK_EX | rundir.fcntl.LOCK_NB)  # a run that has not written its record
    writer = threading.Timer(0.1, rundir._write_holder, [handle])
    writer.start()
    try:
        with pytest.raises(RunDirectoryError, match=f"in use by another run \\(pid {os.getpid()} on host"):
            RunDirectory(tmp_path).acquire()
    finally:
        writer.join()
        os.close(handle)


def test_a_run_whose_lock_file_was_removed_stops_before_writing_again(tmp_path, teacher):
    """Removing .lock lets a second run take a new one: the first stops at its next write."""
    directory = tmp_path / "run"
    config = config_for(directory, teacher)
    intruder = RunDirectory(directory)

    def remove_and_retake():
        (directory / ".lock").unlink()
        intruder.acquire()

    with pytest.raises(RunDirectoryError, match=r"\.lock was removed or replaced while this run held it, so another "
                                                r"run may be using"):
        kdcore.Distiller(config, callbacks=[AtStep(3, remove_and_retake)], console=False).fit()
    assert json.loads((directory / ".lock").read_text())["pid"] == os.getpid()  # the intruder's lock is left alone
    events = [json.loads(line)["event"] for line in (directory / "metrics.jsonl").read_text().splitlines()]
    assert events.count("step") == 3  # steps 0-2: the event of step 3 comes after its hook took the lock away
    intruder.release()


# -- never overwritten -----------------------------------------------------------------------------


@pytest.mark.parametrize("removed", ["checkpoint.pt", "checkpoint.pt+checkpoint.previous.pt", "student.pt"])
def test_a_fresh_run_refuses_any_runs_files(tmp_path, teacher, removed):
    directory = tmp_path / "run"
    kdcore.Distiller(config_for(directory, teacher), console=False).fit()
    for name in removed.split("+"):
        (directory / name).unlink()
    before = run_files(directory)
    with pytest.raises(RunDirectoryError, match=r"already holds a run \(.*metrics.jsonl.*\); resume it"):
        kdcore.Distiller(config_for(directory, teacher), console=False).fit()
    assert run_files(directory) == before


def test_resume_without_a_checkpoint_but_with_results_is_refused(tmp_path, teacher):
    directory = tmp_path / "run"
    kdcore.Distiller(config_for(directory, teacher), console=False).fit()
    (directory / "checkpoint.pt").unlink()
    (directory / "checkpoint.previous.pt").unlink()
    with pytest.raises(RunDirectoryError, match=r"nothing to resume: .*checkpoint.pt does not exist, but .* holds a "
                                                r"run's results \(student.pt, stages\)"):
        kdcore.Distiller(config_for(directory, teacher), console=False).fit(resume=True)


def test_each_checkpoint_keeps_the_one_before(tmp_path):
    directory = RunDirectory(tmp_path)
    directory.save_checkpoint({"version": 1, "n": 1})
    assert not directory.previous_path.exists()
    directory.save_checkpoint({"version": 1, "n": 2})
    directory.save_checkpoint({"version": 1, "n": 3})
    assert rundir.read_checkpoint(directory.checkpoint_path)["n"] == 3
    assert rundir.read_checkpoint(directory.previous_path)["n"] == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.previous.pt", "checkpoint.pt"]


def test_a_write_killed_after_linking_the_previous_leaves_nothing_behind_later(tmp_path):
    """A kill between keeping checkpoint.pt as the previous and replacing it leaves both names on
    one file; the next write must still end with two checkpoints and no temporary file."""
    directory = RunDirectory(tmp_path)
    directory.save_checkpoint({"version": 1, "n": 1})
    os.link(directory.checkpoint_path, directory.previous_path)  # killed there
    directory.save_checkpoint({"version": 1, "n": 2})
    directory.save_checkpoint({"version": 1, "n": 3})
    assert rundir.read_checkpoint(directory.checkpoint_path)["n"] == 3
    assert rundir.read_checkpoint(directory.previous_path)["n"] == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.previous.pt", "checkpoint.pt"]


# -- unreadable checkpoints ------------------------------------------------------------------------


def _spoil(path: Path, how: str) -> None:
    if how == "foreign":  # a torch file holding an object a checkpoint never contains
        torch.save(torch.nn.Linear(2, 2), path)
    else:
        path.write_bytes({"empty": b"", "truncated": path.read_bytes()[:1000], "garbage": b"not a checkpoint\n" * 100}[how])


@pytest.mark.parametrize("how", ["empty", "truncated", "garbage", "foreign"])
def test_an_unreadable_latest_checkpoint_falls_back_to_the_previous(tmp_path, teacher, how):
    directory = tmp_path / "run"
    reference = kdcore.Distiller(config_for(tmp_path / "reference", teacher), console=False).fit()
    config = config_for(directory, teacher, checkpoint={"every_steps": 4})
    crash = AtStep(14, lambda: (_ for _ in ()).throw(KeyboardInterrupt))  # after the checkpoints of steps 7 and 11
    with pytest.raises(KeyboardInterrupt):
        kdcore.Distiller(config, callbacks=[crash], console=False).fit()
    _spoil(directory / "checkpoint.pt", how)
    with pytest.warns(RuntimeWarning, match=r"checkpoint.pt .*; resuming from the checkpoint before it, .*"
                                            r"checkpoint.previous.pt"):
        resumed = kdcore.Distiller(config, console=False).fit(resume=True)
    assert resumed == reference


@pytest.mark.parametrize("how, says", [("empty", "is empty"), ("truncated", "is truncated or not a checkpoint"),
                                       ("garbage", "is truncated or not a checkpoint"),
                                       ("foreign", "is not a kdcore checkpoint")])
def test_no_readable_checkpoint_is_a_clear_error(tmp_path, teacher, capsys, how, says):
    directory = tmp_path / "run"
    config = config_for(directory, teacher)
    kdcore.Distiller(config, console=False).fit()
    for name in ("checkpoint.pt", "checkpoint.previous.pt"):
        _spoil(directory / name, how)
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(config))
    assert cli.main(["distill", str(path), "--resume"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"kdcore distill: cannot resume {directory}: {directory / 'checkpoint.pt'} {says}")
    assert f"{directory / 'checkpoint.previous.pt'} {says}" in err
    assert "weights_only" not in err and "Traceback" not in err and len(err.splitlines()) == 1


def test_a_checkpoint_without_a_runs_records_falls_back_to_the_previous(tmp_path, teacher):
    directory = tmp_path / "run"
    config = config_for(directory, teacher)
    kdcore.Distiller(config, console=False).fit()
    torch.save({"version": 1}, directory / "checkpoint.pt")
    with pytest.warns(RuntimeWarning, match=r"checkpoint.pt is not a kdcore checkpoint \(it has no config, stage"):
        kdcore.Distiller(config, console=False).fit(resume=True)


def test_after_a_fallback_a_kill_during_the_next_write_still_leaves_a_checkpoint(tmp_path, teacher, monkeypatch):
    """Resuming from checkpoint.previous.pt sets the unreadable checkpoint.pt aside, so the next
    write does not keep the unreadable file as the previous one in place of the readable one."""
    directory = tmp_path / "run"
    reference = kdcore.Distiller(config_for(tmp_path / "reference", teacher), console=False).fit()
    config = config_for(directory, teacher, checkpoint={"every_steps": 4})
    with pytest.raises(KeyboardInterrupt):
        kdcore.Distiller(config, callbacks=[AtStep(13, lambda: (_ for _ in ()).throw(KeyboardInterrupt))],
                         console=False).fit()
    _spoil(directory / "checkpoint.pt", "garbage")
    save = rundir.checkpoint.save_atomic

    def killed_writing_the_checkpoint(obj, path):
        if Path(path).name == "checkpoint.pt":
            raise KeyboardInterrupt
        save(obj, path)

    monkeypatch.setattr(rundir.checkpoint, "save_atomic", killed_writing_the_checkpoint)
    with pytest.warns(RuntimeWarning, match="the unreadable file is kept as .*checkpoint.unreadable.pt"), \
            pytest.raises(KeyboardInterrupt):
        kdcore.Distiller(config, console=False).fit(resume=True)
    monkeypatch.setattr(rundir.checkpoint, "save_atomic", save)
    assert (directory / "checkpoint.unreadable.pt").read_bytes() == b"not a checkpoint\n" * 100
    with pytest.warns(RuntimeWarning, match="checkpoint.pt does not exist; resuming from the checkpoint before it"):
        assert kdcore.Distiller(config, console=False).fit(resume=True) == reference


def test_temporary_files_of_a_killed_write_are_removed_at_start(tmp_path, teacher):
    directory = tmp_path / "run"
    kdcore.Distiller(config_for(directory, teacher), console=False).fit()
    leftovers = [directory / ".checkpoint.pt.4242.tmp", directory / "stages" / "0-response_kd" / ".student.pt.4242.tmp"]
    for leftover in leftovers:
        leftover.write_bytes(b"half a checkpoint")
    kdcore.Distiller(config_for(directory, teacher), console=False).fit(resume=True)
    assert not any(leftover.exists() for leftover in leftovers)


# -- the log and resume ----------------------------------------------------------------------------


def test_a_log_shorter_than_the_checkpoint_says_is_an_error_not_padding(tmp_path, teacher):
    directory = tmp_path / "run"
    kdcore.Distiller(config_for(directory, teacher), console=False).fit()
    log = directory / "metrics.jsonl"
    os.truncate(log, 1000)
    with pytest.raises(RunDirectoryError, match=r"metrics.jsonl has 1000 bytes but the checkpoint was written when "
                                                r"it had \d+: the log was cut"):
        kdcore.Distiller(config_for(directory, teacher), console=False).fit(resume=True)
    assert log.stat().st_size == 1000 and b"\0" not in log.read_bytes()


def test_resume_of_a_run_stopped_before_its_first_checkpoint_starts_over(tmp_path, teacher, capsys):
    directory = tmp_path / "run"
    reference = kdcore.Distiller(config_for(tmp_path / "reference", teacher), console=False).fit()
    with pytest.raises(KeyboardInterrupt):
        kdcore.Distiller(config_for(directory, teacher), console=False,
                         callbacks=[AtStep(2, lambda: (_ for _ in ()).throw(KeyboardInterrupt))]).fit()
    assert not (directory / "checkpoint.pt").exists() and (directory / "metrics.jsonl").exists()
    assert kdcore.Distiller(config_for(directory, teacher)).fit(resume=True) == reference
    assert "holds no checkpoint (the run stopped before its first one, or it was deleted): the run starts over" \
        in capsys.readouterr().out
    ref_log = (tmp_path / "reference" / "metrics.jsonl").read_text().splitlines()
    log = (directory / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["event"] for x in log] == [json.loads(x)["event"] for x in ref_log]


def test_teacher_metrics_survive_a_resume_with_the_options_in_another_order(tmp_path, teacher):
    """A config written as YAML has its keys sorted, one given as a dict keeps their order: the
    teachers' metrics a checkpoint keeps must be found either way."""
    reference = kdcore.Distiller(config_for(tmp_path / "reference", teacher), console=False).fit()
    config = config_for(tmp_path / "run", teacher, checkpoint={"every_steps": 2})
    with pytest.raises(KeyboardInterrupt):
        kdcore.Distiller(config, callbacks=[AtStep(11, lambda: (_ for _ in ()).throw(KeyboardInterrupt))],
                         console=False).fit()
    options = config["teachers"][0]["options"]
    config["teachers"][0]["options"] = dict(reversed(list(options.items())))
    assert kdcore.Distiller(config, console=False).fit(resume=True) == reference
    events = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert all("teacher_accuracy" in event for event in events if event["event"] == "eval")


# -- failing before the first step, and what a failed run leaves -----------------------------------


@contextlib.contextmanager
def unprivileged():
    """Runs the block as an unprivileged user when this process is root (root ignores directory
    permissions), so that a read-only directory is read-only."""
    if os.geteuid() != 0:
        yield
        return
    os.seteuid(65534)
    try:
        yield
    finally:
        os.seteuid(0)


@pytest.mark.parametrize("exists", [True, False])
def test_a_read_only_directory_fails_before_the_first_step(exists):
    parent = Path(tempfile.mkdtemp())  # under /tmp, which every user may enter
    parent.chmod(0o755)
    try:
        directory = parent / "run"
        if exists:
            directory.mkdir()
            (directory / ".lock").write_text("")
            (directory / ".lock").chmod(0o666)
            directory.chmod(0o555)
        else:
            parent.chmod(0o555)
        steps = AtStep(0, lambda: None)
        with unprivileged(), pytest.raises(RunDirectoryError, match=f"output_dir {directory} is not writable "
                                                                    r"\(Permission denied\); fix its permissions"):
            kdcore.Distiller(classification_config(directory, method={"name": "supervised"}), callbacks=[steps],
                             console=False).fit()
    finally:
        for path in (parent, parent / "run"):
            if path.exists():
                path.chmod(0o755)
        shutil.rmtree(parent)


@pytest.mark.parametrize("what, says", [
    ("file", "output_dir {d} exists and is not a directory"),
    ("dangling link", "output_dir {d} is a symbolic link to {d}-target, which does not exist"),
    ("lock directory", "{d}/.lock is not a regular file; remove it"),
    ("lock fifo", "{d}/.lock is not a regular file; remove it"),
])
def test_an_output_dir_that_cannot_hold_a_run_is_one_line(tmp_path, capsys, what, says):
    directory = tmp_path / "run"
    if what == "file":
        directory.write_text("mine")
    elif what == "dangling link":
        directory.symlink_to(tmp_path / "run-target")
    else:
        directory.mkdir()
        (directory / ".lock").mkdir() if what == "lock directory" else os.mkfifo(directory / ".lock")
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(classification_config(directory, method={"name": "supervised"})))
    assert cli.main(["distill", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("kdcore distill: " + says.format(d=directory)) and len(err.splitlines()) == 1


@pytest.mark.parametrize("name", ["checkpoint.previous.pt", "metrics.jsonl", "stages"])
def test_a_runs_file_of_the_wrong_kind_fails_before_training(tmp_path, teacher, name):
    directory = tmp_path / "run"
    config = config_for(directory, teacher, checkpoint={"every_steps": 4})
    with pytest.raises(KeyboardInterrupt):
        kdcore.Distiller(config, callbacks=[AtStep(9, lambda: (_ for _ in ()).throw(KeyboardInterrupt))],
                         console=False).fit()
    if name == "stages":  # not there yet: the stage has not ended
        (directory / name).write_text("x")
    else:
        (directory / name).unlink()
        (directory / name).mkdir()
    kind = "is not a directory" if name == "stages" else "is a directory where the run keeps a file"
    with pytest.raises(RunDirectoryError, match=f"{name} {kind}; remove it"):
        kdcore.Distiller(config, callbacks=[AtStep(10, lambda: pytest.fail("trained"))], console=False).fit(resume=True)


def test_a_log_the_run_cannot_write_fails_before_training():
    parent = Path(tempfile.mkdtemp())
    parent.chmod(0o755)
    try:
        directory = parent / "run"
        config = classification_config(directory, method={"name": "supervised"}, training={"epochs": 2})
        with pytest.raises(KeyboardInterrupt):
            kdcore.Distiller(config, callbacks=[AtStep(9, lambda: (_ for _ in ()).throw(KeyboardInterrupt))],
                             console=False).fit()
        if os.geteuid() == 0:  # the directory is the user's, the log someone else's
            os.chown(directory, 65534, 65534)
            os.chown(directory / ".lock", 65534, 65534)
        (directory / "metrics.jsonl").chmod(0o444)
        steps = AtStep(9, lambda: None)
        with unprivileged(), pytest.raises(RunDirectoryError, match=r"metrics.jsonl is not writable \(Permission "
                                                                    r"denied\); fix its permissions"):
            kdcore.Distiller(config, callbacks=[steps], console=False).fit(resume=True)
    finally:
        shutil.rmtree(parent)


def test_nan_stop_says_whether_a_checkpoint_exists(tmp_path):
    config = classification_config(tmp_path, method={"name": "test_distiller:NanAtStep3"},
                                   checkpoint={"every_steps": 2})
    with pytest.raises(FloatingPointError, match=f"the last checkpoint \\({tmp_path / 'checkpoint.pt'}\\) is intact"):
        kdcore.Distiller(config, console=False).fit()


def test_the_final_student_is_written_only_when_the_last_stage_ends(tmp_path, teacher):
    config = classification_config(tmp_path, method={"name": "takd", "assistants": [mlp([32])]}, teachers=[teacher],
                                   training={"epochs": 1})

    class StopAfterFirstStage:
        @kdcore.hookimpl
        def kdcore_stage_start(self, stage):
            if stage.name == "student":
                raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        kdcore.Distiller(config, callbacks=[StopAfterFirstStage()], console=False).fit()
    assert (tmp_path / "stages" / "0-assistant1" / "student.pt").exists()
    assert not (tmp_path / "student.pt").exists()
    kdcore.Distiller(config, console=False).fit(resume=True)
    final = torch.load(tmp_path / "student.pt", weights_only=True)
    assert final["body.0.weight"].shape == (16, FEATURES)  # the student, not the 32-wide assistant
