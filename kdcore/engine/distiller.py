"""The Distiller: runs the stages a method plans, with evaluation, checkpoints and exact resume.

Per stage it builds the student and teachers, lets the method set up (extra modules, taps), then
trains for the stage's epochs. Teachers run in eval mode under ``torch.no_grad()`` unless the stage
trains them. Each optimizer step pulls its ``grad_accum`` micro-batches first and counts their
kept rows over every process, so the method's terms (normalized by that count) add up to the
full-batch loss whatever the accumulation and process count. After each epoch the held-out split
is scored, then a checkpoint is written (model, optimizer, scheduler, RNG states of every process,
stage, epoch, step, log position); a resumed run loads it and continues exactly.

Files in ``output_dir``: ``checkpoint.pt`` (the latest) and ``checkpoint.previous.pt`` (the one
before it), ``metrics.jsonl`` (events), ``stages/<i>-<name>/student.pt`` (each stage's trained
student, a plain state dict; trained teachers beside it as ``teacher<k>.pt``), ``student.pt`` (the
final student, written when the last stage ends) and ``.lock`` (held while a run is going; see
:mod:`kdcore.engine.rundir`). A sharded run (``training.parallel: fsdp``, see
:mod:`kdcore.engine.sharding`) keeps its model and optimizer state in ``shards/<checkpoint>/``,
written by every process; ``student.pt`` and the stage files are plain whole state dicts all the same.
"""

from __future__ import annotations

import contextlib
import json
import math
import re
import time
import warnings
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import pydantic
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from kdcore import plugins
from kdcore.cache import CachedTeacherDataset, held_out_path
from kdcore.engine import checkpoint, distributed, preflight, rundir
from kdcore.engine.builders import build_model, build_splits, build_tokenizers, resolve
from kdcore.engine.config import ConfigError, ModelSpec, RunConfig, check_names, parse_config
from kdcore.engine.context import StageContext
from kdcore.engine.data import Batch, Collate, EvalShard, TrainOrder, loader
from kdcore.engine.method import Method, Outputs, Stage
from kdcore.engine.metrics import Meter
from kdcore.engine.optim import build_optimizer, build_scheduler
from kdcore.engine.rundir import RunDirectory, RunDirectoryError, read_checkpoint
from kdcore.engine.runlog import RunLog, format_metrics
from kdcore.sparse import SparseTeacher

CHECKPOINT_VERSION = 1
# config keys a resumed run may change: where the run lives, and what observes it
RESUME_MAY_CHANGE = ("output_dir", "callbacks")


class Distiller:
    """Trains a student from teachers as a run config says.

    ``config`` is a :class:`RunConfig`, a mapping or a YAML path; ``overrides`` are ``KEY=VALUE``
    strings applied to it; ``callbacks`` are extra callback objects (or registered names) for this
    run, besides those the config lists; ``console=False`` keeps the run off the console (the
    metrics file is written all the same). :meth:`fit` trains, :meth:`evaluate` scores a student.
    Stable attributes for callbacks: ``config``, ``output_dir``, ``stages``, ``method``,
    ``student`` (the current stage's student module), ``context`` (the current stage's
    :class:`StageContext`), ``metrics`` (the latest evaluation).
    """

    def __init__(self, config: RunConfig | Mapping[str, Any] | str | Path, *, overrides: Sequence[str] = (),
                 callbacks: Iterable[Any] = (), console: bool = True) -> None:
        self.config = parse_config(config, list(overrides))
        check_names(self.config)
        self.output_dir = Path(self.config.output_dir)
        self.callbacks = [*self.config.callbacks, *callbacks]
        self.console = console
        self.method = _make_method(self.config)
        self.stages = _checked_stages(self.method, self.config)
        self.student: nn.Module | None = None
        self.context: StageContext | None = None
        self.metrics: dict[str, float] = {}
        self._teacher_metrics: dict[str, dict[str, float]] = {}
        self._directory: RunDirectory | None = None  # the output directory while fit() holds it

    # -- paths ----------------------------------------------------------------------------------

    @property
    def checkpoint_path(self) -> Path:
        return self.output_dir / rundir.CHECKPOINT_NAME

    def stage_model_path(self, index: int, role: str = "student") -> Path:
        """Where stage ``index`` leaves its trained ``role`` (the student, or a trained teacher)."""
        return self.output_dir / rundir.STAGES_NAME / f"{index}-{_slug(self.stages[index].name)}" / f"{role}.pt"

    # -- model specs ----------------------------------------------------------------------------

    def student_spec(self, index: int) -> ModelSpec:
        """The spec of stage ``index``'s student (a reference to an earlier stage resolved to its file)."""
        spec = self.stages[index].student
        if spec is None:
            return self.config.student
        return self._resolve(spec, index, f"stages.{index}.student")

    def teacher_specs(self, index: int) -> list[ModelSpec]:
        specs = self.stages[index].teachers
        if specs is None:
            return list(self.config.teachers)
        return [self._resolve(spec, index, f"stages.{index}.teachers.{i}") for i, spec in enumerate(specs)]

    def _resolve(self, spec: Any, index: int, key: str) -> ModelSpec:
        """A stage's model spec, with ``"previous"`` / ``"stage:NAME"`` turned into the spec of that
        earlier stage's student and the file it was saved to."""
        earlier = _earlier_stage(spec, index, [stage.name for stage in self.stages])
        if earlier is None:
            return _as_spec(spec, key)
        return self.student_spec(earlier).model_copy(
            update={"checkpoint": str(self.stage_model_path(earlier)), "pretrained": False})

    # -- training -------------------------------------------------------------------------------

    def fit(self, resume: bool = False) -> dict[str, float]:
        """Runs every stage (from the checkpoint in ``output_dir`` when ``resume``) and returns the
        final evaluation's metrics. The output directory is locked for the whole run."""
        procs = distributed.start(self.config.device, self.config.training.parallel)
        directory = self._directory = RunDirectory(self.output_dir)
        try:
            with directory:
                return self._fit(procs, directory, resume)
        finally:
            self._directory = None
            procs.close()

    def _fit(self, procs: distributed.Processes, directory: RunDirectory, resume: bool) -> dict[str, float]:
        config = self.config
        saved, takeover = self._open(procs, directory, resume)
        # the run's wall-clock time, counting what earlier attempts spent up to their last checkpoint
        # (a checkpoint written before kdcore recorded it counts as none)
        self._seconds = 0.0 if saved is None else saved.get("seconds", 0.0)
        self._started = time.perf_counter() - self._seconds
        checkpoint.seed_everything(config.seed)
        train, val = build_splits(config.data, build_tokenizers(config.student, config.teachers))
        _check_batching(config, procs, len(train))
        log = RunLog(directory.log_path, enabled=procs.is_main, console=self.console, guard=directory.check_held)
        if takeover:
            log.say(takeover)
        if isinstance(train, CachedTeacherDataset) and not isinstance(val, CachedTeacherDataset):
            log.say(f"data.teacher_cache: {held_out_path(config.data.teacher_cache)} holds no cache of the held-out "
                    "split, so the student is not scored against the cached teacher (kdcore cache-teacher --split "
                    "val writes it)")
        first_stage, stage_state = 0, None
        if saved is None and resume:
            log.truncate(0)  # the events of an attempt that stopped before its first checkpoint
            log.say(f"{self.output_dir} holds no checkpoint (the run stopped before its first one, or it was "
                    "deleted): the run starts over")
        if saved is not None:
            log.truncate(saved["log_offset"])  # events of work done after the checkpoint, redone now
            first_stage, stage_state = saved["stage"], saved["stage_state"]
            self.metrics = saved["metrics"]
            self._teacher_metrics = {_canonical(key): value for key, value in saved["teacher_metrics"].items()}
            if stage_state is None:
                checkpoint.set_rng_state(_rng_of(saved, procs))
            log.say(f"resuming {self.output_dir} at stage {first_stage} "
                    + (f"epoch {stage_state['epoch']} step {stage_state['step']}" if stage_state else "(start)"))
        host = plugins.host()
        with host.active_callbacks(self.callbacks):
            host.call("kdcore_run_start", run=self)
            for index in range(first_stage, len(self.stages)):
                rng = _rng_of(saved, procs) if stage_state is not None else None
                _Stage(self, procs, log, index, train, val).execute(stage_state, rng)
                stage_state = None
            host.call("kdcore_run_end", run=self, metrics=dict(self.metrics))
        log.event("run_end", metrics=self.metrics, seconds=round(self._seconds, 1))
        log.say(f"{self.output_dir}: trained in {_duration(self._seconds)}")
        return dict(self.metrics)

    def _open(self, procs: distributed.Processes, directory: RunDirectory,
              resume: bool) -> tuple[dict[str, Any] | None, str | None]:
        """Locks the output directory (main process) and finds what this run starts from: nothing
        for a fresh run (which the directory must not hold), else the checkpoint to resume. Every
        process gets the main process's verdict, so all of them stop on a busy or unusable directory.
        Returns the checkpoint (None when the run starts from the beginning) and a note when a dead
        run's lock was taken over."""
        verdict: dict[str, Any] = {"error": None, "path": None, "takeover": None}
        saved = None
        if procs.is_main:
            try:
                verdict["takeover"] = directory.acquire()
                point = directory.resume_point() if resume else None
                if point is not None:
                    path, saved = point
                    directory.check_log(saved.get("log_offset", 0))
                    verdict["path"] = str(path)
                elif not resume:
                    directory.check_fresh()
            except RunDirectoryError as exc:
                verdict["error"] = str(exc)
        verdict = procs.broadcast(verdict)
        if verdict["error"]:
            raise RunDirectoryError(verdict["error"])
        if verdict["path"] is None:
            return None, verdict["takeover"]
        if saved is None:
            saved = read_checkpoint(Path(verdict["path"]))
        self._check_resumable(saved, Path(verdict["path"]))
        return saved, verdict["takeover"]

    def _check_resumable(self, saved: Mapping[str, Any], path: Path) -> None:
        if saved.get("version") != CHECKPOINT_VERSION:
            raise RunDirectoryError(f"{path} was written by an incompatible kdcore "
                                    f"(checkpoint version {saved.get('version')}, expected {CHECKPOINT_VERSION})")
        differences = [key for key in _differences(saved["config"], self.config.model_dump(mode="json"))
                       if key.split(".")[0] not in RESUME_MAY_CHANGE]
        if differences:
            raise ConfigError(f"cannot resume {self.output_dir}: the config differs from the one it was started "
                              f"with at {', '.join(differences[:10])}; resume with the same config")

    def save_checkpoint(self, procs: distributed.Processes, log: RunLog, stage: int,
                        stage_state: dict[str, Any] | None) -> None:
        """Writes ``checkpoint.pt``, keeping the one it replaces as ``checkpoint.previous.pt``
        (every process takes part: RNG states are gathered)."""
        rng = procs.gather(checkpoint.rng_state())
        self._seconds = time.perf_counter() - self._started
        if procs.is_main:
            directory = self._directory or RunDirectory(self.output_dir)
            directory.save_checkpoint({
                "version": CHECKPOINT_VERSION, "config": self.config.model_dump(mode="json"), "stage": stage,
                "stage_state": stage_state, "rng": rng, "log_offset": log.offset(), "metrics": self.metrics,
                "teacher_metrics": self._teacher_metrics, "seconds": self._seconds,
            })
            if procs.sharded:
                directory.prune_shards()
        procs.barrier()

    # -- evaluation -----------------------------------------------------------------------------

    def evaluate(self, student_checkpoint: str | Path | None = None) -> dict[str, float]:
        """Scores the final stage's student (from ``student_checkpoint``, default
        ``output_dir/student.pt``) on the held-out split, against the run's teachers (or the
        held-out split's cached teacher, see :func:`evaluate_student`)."""
        procs = distributed.start(self.config.device)
        try:
            index = len(self.stages) - 1
            path = Path(student_checkpoint or self.output_dir / rundir.STUDENT_NAME)
            spec = self.student_spec(index).model_copy(update={"checkpoint": str(path), "pretrained": False})
            student = build_model(spec, "student").to(procs.device)
            teachers = [build_model(t, f"teachers.{i}").to(procs.device) for i, t in enumerate(self.teacher_specs(index))]
            _, val = build_splits(self.config.data, build_tokenizers(self.config.student, self.config.teachers))
            models = {"student": student, **{f"teacher{i}": t for i, t in enumerate(teachers)}}
            ctx = StageContext(self, self.stages[index], index, procs.device, models)
            metrics = evaluate_student(self, ctx, procs, val)
            for i, _ in enumerate(teachers):
                metrics.update(_prefixed(evaluate_teacher(self, ctx, procs, val, i), _teacher_prefix(i, len(teachers))))
            return metrics
        finally:
            procs.close()


class _Stage:
    """One stage of one run: its models, optimizer, and the loop over epochs and steps."""

    def __init__(self, run: Distiller, procs: distributed.Processes, log: RunLog, index: int, train, val) -> None:
        self.run, self.procs, self.log, self.index = run, procs, log, index
        self.stage: Stage = run.stages[index]
        self.train, self.val = train, val
        self.config = run.config
        self.epochs = self.stage.epochs or self.config.training.epochs
        self.steps_per_epoch = len(train) // self.config.data.batch_size

    def execute(self, state: dict[str, Any] | None, rng: dict[str, Any] | None) -> None:
        run, config, procs, stage = self.run, self.config, self.procs, self.stage
        device = procs.device
        specs = {"student": (self._key("student", stage.student), run.student_spec(self.index))}
        specs.update({f"teacher{i}": (self._key(f"teachers.{i}", stage.teachers), spec)
                      for i, spec in enumerate(run.teacher_specs(self.index))})
        models = {role: build_model(spec, key) for role, (key, spec) in specs.items()}
        unknown = set(stage.trainable) - set(models)
        if unknown:
            raise ConfigError(f"stage {stage.name!r}: trainable names {sorted(unknown)}, but the stage has "
                              f"{', '.join(models)}")
        for role, model in models.items():
            if role not in stage.trainable:
                model.requires_grad_(False).eval()
        self.sharding = None
        if procs.sharded:  # built on the CPU; each process's device receives only its shards
            from kdcore.engine.sharding import Sharding  # torch.distributed's FSDP, only for sharded runs

            self.sharding = Sharding(procs, config.training.fsdp, models, stage.trainable)
            self.log.say(f"[{stage.name}] {self.sharding.describe()}")
        else:
            models = {role: model.to(device) for role, model in models.items()}
        copier = None
        if self.sharding is not None:
            def copier(role: str) -> nn.Module:
                return self.sharding.frozen_copy(lambda: build_model(specs[role][1], specs[role][0]), models[role])
        ctx = self.ctx = run.context = StageContext(run, stage, self.index, device, models, copier=copier)
        ctx.ignore_index = config.data.ignore_index
        run.student = models["student"]
        ctx.example = Collate(self.train)([self.train[i] for i in range(min(2, len(self.train)))])
        first_batch = Collate(self.train)([self.train[i] for i in range(min(config.data.batch_size, len(self.train)))])
        preflight.check_stage(ctx, specs, run.method, config.data.dataset, first_batch.labels, self._method_code)
        try:
            with self._method_code("setup", passes=(ValueError, TypeError)):  # how setup rejects a config
                run.method.setup(ctx)
        except ValueError as exc:
            if isinstance(exc, ConfigError):
                raise
            raise ConfigError(f"method: {exc}") from None
        if self.sharding is not None:
            self.sharding.shard_added_modules(ctx)
            self.sharding.release(ctx.models)  # what the preflight and the method's dry runs gathered
            self._frozen = {role: ctx.raw(role) for role in ctx.models if role not in stage.trainable}
            self._frozen.update({name: ctx.modules[name] for name in ctx.modules if name not in ctx.trainable_modules})
        trained = self._trained = \
            [models[role] for role in stage.trainable] + [ctx.modules[n] for n in sorted(ctx.trainable_modules)]
        self.parameters = _unique_parameters(trained)
        self.optimizer = build_optimizer(config.optimizer, self.parameters)
        self.scheduler = build_scheduler(config.scheduler, self.optimizer, self.epochs * self.steps_per_epoch)
        start_epoch, start_step = 0, 0
        if state is not None:
            self._load(state)
            checkpoint.set_rng_state(rng)
            start_epoch, start_step = state["epoch"], state["step"]
        self._wrap_for_ddp(ctx)
        if state is None:
            self._evaluate_teachers()
        host = plugins.host()
        host.call("kdcore_stage_start", run=run, stage=stage)
        try:
            for epoch in range(start_epoch, self.epochs):
                host.call("kdcore_epoch_start", run=run, stage=stage, epoch=epoch)
                self._train_epoch(epoch, start_step if epoch == start_epoch else 0)
                self._evaluate(epoch)
                run.save_checkpoint(procs, self.log, self.index, self._state(epoch + 1, 0))
                host.call("kdcore_epoch_end", run=run, stage=stage, epoch=epoch)
        finally:
            ctx.close()
            self._unwrap_ddp(ctx)
        self._finish()
        host.call("kdcore_stage_end", run=run, stage=stage)

    def _method_code(self, where: str, passes: tuple[type[Exception], ...] = ()):
        return _method_code(self.config, where, passes)

    def _key(self, role: str, planned: Any) -> str:
        """How errors name a model: by its config key when the stage uses the config's models."""
        return role if planned is None else f"stages.{self.index}.{role}"

    def _whole_state(self, role: str) -> dict[str, torch.Tensor]:
        """The whole state dict of ``role``'s model (gathered from its shards onto the first
        process when the run is sharded): what the plain ``.pt`` files hold."""
        if self.sharding is not None:
            return self.sharding.full_state(self.ctx.raw(role))
        return self.ctx.raw(role).state_dict()

    # -- one epoch ------------------------------------------------------------------------------

    def _train_epoch(self, epoch: int, start_step: int) -> None:
        config, procs, ctx = self.config, self.procs, self.ctx
        order = TrainOrder(len(self.train), batch_size=config.data.batch_size, grad_accum=config.training.grad_accum,
                           rank=procs.rank, world_size=procs.world_size, seed=config.seed, epoch=epoch,
                           shuffle=config.data.shuffle, start_step=start_step)
        batches = iter(loader(self.train, order, order.micro_batch_size, num_workers=config.data.num_workers,
                              seed=config.seed + epoch, pin_memory=procs.device.type == "cuda"))
        for role in self.stage.trainable:
            ctx.raw(role).train()
        for name in ctx.modules:
            ctx.modules[name].train(name in ctx.trainable_modules)
        ctx.epoch = epoch
        bar = self.log.progress(self.steps_per_epoch, start_step, f"{self.stage.name} {epoch + 1}/{self.epochs}")
        started, seen = time.perf_counter(), 0
        with bar:
            for step in range(start_step, self.steps_per_epoch):
                micro = [next(batches) for _ in range(config.training.grad_accum)]
                ctx.step = epoch * self.steps_per_epoch + step
                losses = self._optimizer_step(micro)
                seen += config.data.batch_size
                throughput = seen / max(time.perf_counter() - started, 1e-9)
                plugins.host().call("kdcore_step_end", run=self.run, stage=self.stage, step=ctx.step, losses=losses)
                bar.update(1)
                bar.set_postfix(loss=f"{losses['total']:.4g}", ex_s=f"{throughput:.0f}")
                last = step + 1 == self.steps_per_epoch
                if (ctx.step + 1) % config.training.log_every == 0 or last:
                    self.log.event("step", stage=self.stage.name, epoch=epoch, step=ctx.step,
                                   lr=self.scheduler.get_last_lr()[0], examples_per_s=throughput, **losses)
                every = config.checkpoint.every_steps
                if every and (step + 1) % every == 0 and not last:
                    self.run.save_checkpoint(procs, self.log, self.index, self._state(epoch, step + 1))

    def _optimizer_step(self, micro: list[Batch]) -> dict[str, float]:
        """Forward, backward and update for one optimizer step on its micro-batches (still on the
        CPU, where counting their rows costs no device sync, unless the method's ``prepare_batch``
        made them on the device); returns the step's loss terms (full-batch values, the same on
        every process)."""
        config, procs, ctx = self.config, self.procs, self.ctx
        method = self.run.method
        with self._method_code("prepare_batch"):
            micro = [method.prepare_batch(batch, ctx) for batch in micro]
        kept = procs.sum(torch.tensor([float(sum(b.kept_rows(ctx.ignore_index) for b in micro))]))
        ctx.normalizer = max(float(kept[0]), 1.0) / procs.world_size
        ctx.example_normalizer = config.data.batch_size / procs.world_size
        totals: dict[str, torch.Tensor] = {}
        for position, batch in enumerate(micro):
            batch = batch.to(procs.device)
            if self.sharding is not None:  # what DDP's forward does: every process starts from the first one's buffers
                procs.broadcast_buffers(self._trained)
            with self._no_sync(position + 1 < len(micro)), _autocast(procs.device, config.training.precision):
                with self._method_code("run_models"):
                    outputs = method.run_models(batch, ctx, self.stage.trainable)
                with self._method_code("losses"):
                    terms = method.losses(batch, outputs, ctx)
                terms = _checked_terms(method, terms)
                self._check_weights(terms)
                total = sum(self._weight(name) * value for name, value in terms.items())
            if not isinstance(total, torch.Tensor) or not total.requires_grad:
                raise RuntimeError(f"method {self.config.method.name!r}: its loss terms {sorted(terms)} do not depend "
                                   "on any trained parameter")
            total.backward()
            if self.sharding is not None:  # frozen models have no backward to free their gathered roots
                self.sharding.release(self._frozen)
            for name, value in [*terms.items(), ("total", total)]:
                totals[name] = totals.get(name, 0.0) + value.detach().float()
        names = list(totals)
        values = procs.sum(torch.stack([totals[n].reshape(()) for n in names]).cpu().double()) / procs.world_size
        losses = dict(zip(names, values.tolist()))
        bad = [name for name, value in losses.items() if not math.isfinite(value)]
        if bad:  # checked before the update, so the models keep their last finite weights
            raise FloatingPointError(f"stage {self.stage.name!r} step {ctx.step}: loss terms {bad} are not finite "
                                     f"({ {n: losses[n] for n in bad} }); {self._checkpoint_note()}")
        if config.training.max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(self.parameters, config.training.max_grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return losses

    def _checkpoint_note(self) -> str:
        path = self.run.checkpoint_path
        if path.exists():
            return f"the last checkpoint ({path}) is intact"
        return "no checkpoint was written yet"

    def _check_weights(self, terms: Mapping[str, torch.Tensor]) -> None:
        unknown = sorted(set(self.config.training.loss_weights) - set(terms))
        if unknown:
            raise ConfigError(f"training.loss_weights: {unknown} are not loss terms of method "
                              f"{self.config.method.name!r} (its terms: {', '.join(sorted(terms))})")

    def _weight(self, name: str) -> float:
        weights = self.config.training.loss_weights
        return float(weights.get(name, self.run.method.default_weights.get(name, 1.0)))

    @contextlib.contextmanager
    def _no_sync(self, skip: bool):
        """Defers DDP's gradient all-reduce to the last micro-batch of an optimizer step."""
        with contextlib.ExitStack() as stack:
            if skip:
                for module in self._ddp:
                    stack.enter_context(module.no_sync())
            yield

    # -- evaluation -----------------------------------------------------------------------------

    def _evaluate_teachers(self) -> None:
        """Scores each teacher on the held-out split once per run (per distinct teacher); a teacher
        the stage trains (a mutual-learning peer) is not a fixed reference and is not scored."""
        run = self.run
        specs = run.teacher_specs(self.index)
        for i, spec in enumerate(specs):
            key = _teacher_key(spec)
            if key not in run._teacher_metrics and f"teacher{i}" not in self.stage.trainable:
                metrics = evaluate_teacher(run, self.ctx, self.procs, self.val, i)
                run._teacher_metrics[key] = metrics
                self.log.event("teacher_eval", stage=self.stage.name, teacher=i, **metrics)
                self.log.say(f"[{self.stage.name}] teacher{i}: {format_metrics(metrics)}")

    def _evaluate(self, epoch: int) -> None:
        run = self.run
        metrics = evaluate_student(run, self.ctx, self.procs, self.val)
        specs = run.teacher_specs(self.index)
        for i, spec in enumerate(specs):
            metrics.update(_prefixed(run._teacher_metrics.get(_teacher_key(spec), {}),
                                     _teacher_prefix(i, len(specs))))
        run.metrics = metrics
        self.log.event("eval", stage=self.stage.name, epoch=epoch, step=self.ctx.step, **metrics)
        self.log.say(f"[{self.stage.name}] epoch {epoch + 1}/{self.epochs}: {format_metrics(metrics)}")
        plugins.host().call("kdcore_evaluated", run=run, stage=self.stage, epoch=epoch, metrics=dict(metrics))

    # -- state ----------------------------------------------------------------------------------

    def _wrap_for_ddp(self, ctx: StageContext) -> None:
        self._ddp: list[DistributedDataParallel] = []
        if not self.procs.distributed or self.procs.sharded:
            return
        device_ids = [self.procs.device.index] if self.procs.device.type == "cuda" else None
        tables = [(ctx.models, role) for role in self.stage.trainable]
        tables += [(ctx.modules, name) for name in sorted(ctx.trainable_modules)]
        for table, name in tables:
            if any(p.requires_grad for p in table[name].parameters()):
                wrapped = DistributedDataParallel(table[name], device_ids=device_ids,
                                                  find_unused_parameters=self.config.training.find_unused_parameters)
                table[name] = wrapped
                self._ddp.append(wrapped)

    def _unwrap_ddp(self, ctx: StageContext) -> None:
        """Puts the raw modules back where the stage's DDP wrappers stood and drops the wrappers.
        A wrapper still alive when the process group is destroyed tears down its reducer against a
        dead group, which aborts the process (``terminate called without an active exception``)
        after an otherwise successful run."""
        for table, prefix in ((ctx.models, ""), (ctx.modules, "module:")):
            for name, module in list(table.items()):
                if isinstance(module, DistributedDataParallel):
                    table[name] = ctx.raw(prefix + name)
        self._ddp.clear()

    def _state(self, epoch: int, step: int) -> dict[str, Any]:
        ctx = self.ctx
        if self.sharding is not None:  # every process writes its shards; the checkpoint names their directory
            name = f"{self.index}-{epoch}-{step}"
            directory = self.run._directory or RunDirectory(self.run.output_dir)
            if self.procs.is_main:
                directory.check_held()
            self.procs.broadcast_buffers(self._trained)  # DCP keeps one process's copy of what is not sharded
            manifest = self.sharding.save(directory.shards_path(name), ctx, self.optimizer)
            return {"epoch": epoch, "step": step, "shards": name, "shard_files": manifest,
                    "scheduler": self.scheduler.state_dict()}
        return {
            "epoch": epoch, "step": step,
            "models": {role: ctx.raw(role).state_dict() for role in ctx.models},
            "modules": {name: ctx.raw(f"module:{name}").state_dict() for name in ctx.modules},
            "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
        }

    def _load(self, state: dict[str, Any]) -> None:
        ctx = self.ctx
        if "shards" in state:
            if self.sharding is None:
                raise ConfigError(f"{self.run.checkpoint_path} holds a sharded run's state; resume it with "
                                  "training.parallel: fsdp")
            self.sharding.load(RunDirectory(self.run.output_dir).shards_path(state["shards"]), ctx, self.optimizer)
            self.scheduler.load_state_dict(state["scheduler"])
            return
        if set(state["modules"]) != set(ctx.modules):
            raise ValueError(f"the checkpoint's extra modules {sorted(state['modules'])} are not the ones the method "
                             f"set up ({sorted(ctx.modules)})")
        for role in ctx.models:
            ctx.raw(role).load_state_dict(state["models"][role])
        for name in ctx.modules:
            ctx.raw(f"module:{name}").load_state_dict(state["modules"][name])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])

    def _finish(self) -> None:
        run, procs = self.run, self.procs
        procs.broadcast_buffers([self.ctx.raw(role) for role in self.stage.trainable])
        states = {role: self._whole_state(role) for role in dict.fromkeys(("student", *self.stage.trainable))}
        if procs.is_main:
            if run._directory is not None:
                run._directory.check_held()
            for role, state in states.items():
                checkpoint.save_atomic(state, run.stage_model_path(self.index, role))
            if self.index == len(run.stages) - 1:  # the final student; a stage's own student keeps its stage name
                checkpoint.save_atomic(states["student"], run.output_dir / rundir.STUDENT_NAME)
        self.log.event("stage_end", stage=self.stage.name, index=self.index, metrics=run.metrics)
        run.save_checkpoint(procs, self.log, self.index + 1, None)


# -- shared by training and `kdcore eval` ---------------------------------------------------------


def evaluate_student(run: Distiller, ctx: StageContext, procs: distributed.Processes, val) -> dict[str, float]:
    """The student's metrics on ``val``, against what the method compares it with: the teacher
    prediction it names (:meth:`Method.teacher_logits`), else the held-out split's cached top-k
    teacher when the run's cache directory has one (a run without a teacher model, ``cached_kd``)."""
    temperature = val.cache.spec.temperature if isinstance(val, CachedTeacherDataset) else 1.0

    def pick(batch: Batch, outputs: Outputs) -> tuple[torch.Tensor, torch.Tensor | SparseTeacher | None]:
        with _method_code(run.config, "teacher_logits"):
            reference = run.method.teacher_logits(outputs)
        return outputs.student, batch.teacher if reference is None else reference

    return _metrics(run, ctx, procs, val, pick, "student", teacher_temperature=temperature)


def evaluate_teacher(run: Distiller, ctx: StageContext, procs: distributed.Processes, val, index: int) -> dict[str, float]:
    """Teacher ``index``'s own metrics on ``val`` (on its own tokenization of the text, when it has one)."""
    return _metrics(run, ctx, procs, val, lambda batch, outputs: (outputs.teachers[index], None), f"teacher{index}")


def _metrics(run: Distiller, ctx: StageContext, procs: distributed.Processes, val, pick, role: str,
             teacher_temperature: float = 1.0) -> dict[str, float]:
    """Metrics of the prediction ``pick(batch, outputs)`` gives as ``(logits, reference teacher or
    None)`` against the labels model ``role`` reads, summed over every process's shard; a sparse
    reference's log-probabilities were taken at ``teacher_temperature``."""
    meter = _meter(run.config)

    def score(batch: Batch, outputs: Outputs) -> None:
        prediction, reference = pick(batch, outputs)
        view = batch.seen_by(role)
        meter.update(prediction, view.labels, reference, label_bytes=view.label_bytes,
                     teacher_temperature=teacher_temperature)

    _sweep(run, ctx, procs, val, score)
    meter.sums = procs.sum(meter.sums)
    return meter.compute()


def _sweep(run: Distiller, ctx: StageContext, procs: distributed.Processes, val, score) -> None:
    """Runs every model over this process's shard of ``val`` in eval mode, calling ``score``."""
    config = run.config
    modes = {name: ctx.raw(name).training for name in ctx.models}
    for name in ctx.models:
        ctx.raw(name).eval()
    procs.broadcast_buffers([ctx.raw(name) for name in ctx.models])  # every shard scored by the same model
    batches = loader(val, EvalShard(len(val), procs.rank, procs.world_size), config.data.eval_batch_size,
                     num_workers=config.data.num_workers, seed=config.seed, pin_memory=procs.device.type == "cuda")
    # sharded models gather their parameters from every process at each forward pass, so every
    # process runs as many passes as the longest shard needs (the extra ones are not scored)
    padding = max(procs.gather(len(batches))) - len(batches) if procs.sharded else 0
    try:
        with torch.no_grad(), _autocast(procs.device, config.training.precision):
            for batch in batches:
                batch = batch.to(procs.device)
                score(batch, ctx.run_models(batch))
            for _ in range(padding):
                ctx.run_models(ctx.example.to(procs.device))
    finally:
        for name, mode in modes.items():
            ctx.raw(name).train(mode)
        if procs.sharded:
            from kdcore.engine.sharding import Sharding

            Sharding.release({name: ctx.raw(name) for name in ctx.models})


# -- helpers ----------------------------------------------------------------------------------------


def _method_code(config: RunConfig, where: str, passes: tuple[type[Exception], ...] = ()):
    """A context for the method's own code (its factory, ``plan``, ``setup``, ``losses``, ...): an
    exception raised there, other than the kinds in ``passes`` (how it rejects a config), names the
    plugin that registered the method."""
    host = plugins.host()
    return host.blame(host.methods, config.method.name, where, passes)


def _make_method(config: RunConfig) -> Method:
    factory = resolve(config.method.name, plugins.host().methods, "method.name")
    try:
        with _method_code(config, "its factory", passes=(TypeError, ValueError)):
            method = factory(config.method.options())
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"method: {exc}") from None
    if not isinstance(method, Method):
        raise TypeError(f"method {config.method.name!r}: its factory returned {type(method).__name__}, "
                        "not a kdcore.Method")
    return method


def _checked_stages(method: Method, config: RunConfig) -> list[Stage]:
    try:
        with _method_code(config, "plan", passes=(ValueError,)):
            stages = method.plan(config)
    except ValueError as exc:
        raise ConfigError(f"method: {exc}") from None
    if not isinstance(stages, list) or not stages or not all(isinstance(s, Stage) for s in stages):
        raise TypeError(f"method {config.method.name!r}: plan() must return a non-empty list of kdcore.Stage")
    names = [s.name for s in stages]
    if len(set(names)) != len(names):
        raise ValueError(f"method {config.method.name!r}: stage names must be unique, got {names}")
    for index, stage in enumerate(stages):
        for spec in [stage.student, *(stage.teachers or [])]:
            try:
                _earlier_stage(spec, index, names)
            except ValueError as exc:
                raise ValueError(f"method {config.method.name!r}: stage {stage.name!r}: {exc}") from None
        if stage.epochs is not None and (not isinstance(stage.epochs, int) or stage.epochs < 1):
            raise ValueError(f"method {config.method.name!r}: stage {stage.name!r} has epochs={stage.epochs!r}")
        if not stage.trainable:
            raise ValueError(f"method {config.method.name!r}: stage {stage.name!r} trains nothing")
    return stages


def _check_batching(config: RunConfig, procs: distributed.Processes, train_size: int) -> None:
    data, accum = config.data, config.training.grad_accum
    if data.batch_size % (accum * procs.world_size):
        raise ConfigError(f"data.batch_size: {data.batch_size} examples per step must split evenly into "
                          f"training.grad_accum ({accum}) micro-batches on each of {procs.world_size} processes")
    if train_size < data.batch_size:
        raise ConfigError(f"data.batch_size: {data.batch_size} is larger than the training split "
                          f"({train_size} examples); an epoch would have no step")


def _checked_terms(method: Method, terms: Any) -> dict[str, torch.Tensor]:
    if not isinstance(terms, Mapping) or not terms:
        raise TypeError(f"{type(method).__name__}.losses must return a non-empty dict of named loss terms, "
                        f"got {type(terms).__name__}")
    for name, value in terms.items():
        if not isinstance(value, torch.Tensor) or value.numel() != 1:
            raise TypeError(f"{type(method).__name__}.losses: term {name!r} must be a scalar tensor, got "
                            f"{type(value).__name__}{tuple(value.shape) if isinstance(value, torch.Tensor) else ''}")
        if name == "total":
            raise ValueError(f"{type(method).__name__}.losses: 'total' is reserved for the weighted sum")
    return dict(terms)


def _meter(config: RunConfig) -> Meter:
    return Meter(task=config.eval.task, ignore_index=config.data.ignore_index, bins=config.eval.ece_bins)


def _autocast(device: torch.device, precision: str):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")


def _unique_parameters(modules: Iterable[nn.Module]) -> list[nn.Parameter]:
    seen, out = set(), []
    for module in modules:
        for parameter in module.parameters():
            if parameter.requires_grad and id(parameter) not in seen:
                seen.add(id(parameter))
                out.append(parameter)
    return out


def _as_spec(spec: Any, key: str) -> ModelSpec:
    if isinstance(spec, ModelSpec):
        return spec
    if isinstance(spec, Mapping):
        try:
            return ModelSpec.model_validate(dict(spec))
        except pydantic.ValidationError as exc:
            raise ConfigError(f"{key}: {' '.join(str(exc).split())}") from None
    raise TypeError(f"{key}: a model spec is a ModelSpec, a mapping or 'previous', got {spec!r}")


def _earlier_stage(spec: Any, index: int, names: list[str]) -> int | None:
    """The index of the earlier stage ``spec`` refers to (``"previous"``, ``"stage:NAME"``), or
    None when it is not such a reference."""
    if spec == "previous":
        if index == 0:
            raise ValueError("the first stage has no previous stage")
        return index - 1
    if isinstance(spec, str) and spec.startswith("stage:"):
        name = spec[len("stage:"):]
        if name not in names[:index]:
            raise ValueError(f"{spec!r} does not name an earlier stage (earlier stages: {names[:index] or 'none'})")
        return names.index(name)
    return None


def _rng_of(saved: Mapping[str, Any], procs: distributed.Processes) -> dict[str, Any]:
    """This process's RNG states from a checkpoint. Resuming with another number of processes
    trains on the same global batches, but random draws (dropout) differ from the original run."""
    states = saved["rng"]
    if len(states) != procs.world_size:
        warnings.warn(f"resuming a run checkpointed with {len(states)} processes on {procs.world_size}: training "
                      "continues on the same batches, but random draws (dropout) will not repeat the original run's",
                      RuntimeWarning, stacklevel=3)
    return states[procs.rank % len(states)]


def _differences(old: Any, new: Any, prefix: str = "") -> list[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for key in sorted(set(old) | set(new)):
            out += _differences(old.get(key), new.get(key), f"{prefix}{key}.")
        return out
    return [] if old == new else [prefix.rstrip(".") or "(top level)"]


def _teacher_key(spec: ModelSpec) -> str:
    """What a teacher's metrics are remembered by: its spec as JSON with sorted keys, so that the
    order of its options in a config (a YAML file is written sorted, a dict is not) does not matter."""
    return json.dumps(spec.model_dump(mode="json"), sort_keys=True)


def _canonical(key: str) -> str:
    """A checkpoint's teacher key as :func:`_teacher_key` writes it (older checkpoints kept the
    options in the config's order)."""
    try:
        return json.dumps(json.loads(key), sort_keys=True)
    except ValueError:
        return key


def _teacher_prefix(index: int, count: int) -> str:
    return "teacher_" if count == 1 else f"teacher{index}_"


def _prefixed(metrics: Mapping[str, float], prefix: str) -> dict[str, float]:
    return {prefix + key: value for key, value in metrics.items()}


def _duration(seconds: float) -> str:
    """``seconds`` as minutes and seconds, e.g. ``4 min 57 s``."""
    minutes, rest = divmod(round(seconds), 60)
    return f"{minutes} min {rest:02d} s" if minutes else f"{rest} s"


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", name).strip("-") or "stage"
