"""Every hook kdcore calls. A plugin implements any of them with ``@kdcore.hookimpl``.

There are two kinds:

* **Registration hooks** (``kdcore_register_*``) are called once per plugin, when the plugin is
  loaded. Each receives a ``register`` callable; the plugin calls it once per thing it provides.
  Names are global: registering a name another plugin already took is refused with a warning that
  names both plugins, and the first registration (built-ins load first) stays.
* **Lifecycle hooks** (``kdcore_run_start`` ... ``kdcore_evaluated``) are called by the
  :class:`kdcore.Distiller` while it trains. A plugin module that implements them sees every run;
  a *callback* (an object registered with ``kdcore_register_callbacks`` and switched on by name in a
  run's config) sees only the runs that ask for it. Their return values are ignored, and an
  exception in one stops the run (a callback that checkpoints or validates must be able to) as a
  :class:`kdcore.plugins.PluginFault` naming the plugin and the hook.

Lifecycle hooks are called with keyword arguments; an implementation may accept any subset of
them (pluggy passes only the arguments the implementation names). ``run`` is the Distiller doing
the work: ``run.config``, ``run.output_dir``, ``run.student``, ``run.context`` (the current
stage's :class:`kdcore.StageContext`) and ``run.metrics`` (the latest evaluation) are the stable
attributes.
"""

import pluggy

hookspec = pluggy.HookspecMarker("kdcore")


# -- registration ---------------------------------------------------------------------------------


@hookspec
def kdcore_register_methods(register):
    """Register distillation methods.

    Call ``register(name, factory, description="")`` for each method. ``factory(config)`` receives
    the method's section of a run config (a dict) and returns a :class:`kdcore.Method`: it plans the
    run's stages and gives the named loss terms of each training step. Raise ``ValueError`` naming
    the key for a bad config.
    """


@hookspec
def kdcore_register_losses(register):
    """Register loss functions that method configs choose by name (``loss: NAME``).

    Call ``register(name, fn, description="")`` for each. Methods call it as :func:`kdcore.kd_loss`
    is called::

        fn(student_logits, teacher_logits, *, labels=None, ignore_index=-100, temperature=1.0,
           reduction="batchmean", normalizer=None, **own_options)

    with logits ``[..., V]`` of one shape (a row per example or token) and ``labels`` ``[...]``.
    It returns the reduced loss, a tensor differentiable in ``student_logits`` (kdcore's methods
    pass teacher logits that need no gradient).

    Every call passes ``labels``, ``ignore_index``, ``temperature``, ``reduction`` and
    ``normalizer``. Rows labelled ``ignore_index`` count for nothing (without labels every row
    counts). ``temperature`` is the method's; what it does is the loss's choice (kd_loss softens
    both sides and scales by T²). Methods pass ``reduction="batchmean"``: the sum over kept rows
    divided by ``normalizer``, or by the number of kept rows when it is None, 0 with none kept (the
    engine's normalizer counts the kept rows of the whole step, so that gradient accumulation and
    several processes give the full-batch mean); ``"sum"`` and ``"none"`` (per row, 0 where dropped)
    are as in kd_loss. :func:`kdcore.engine.named_loss.reduce_rows` is this reduction.

    Passed only when the method's config sets them: its ``beta`` and ``alpha`` (kd_loss's mixing
    weights, on methods that have them) and the loss's own options, ``loss: {name: NAME, option:
    value}``. A loss declares its own options as keyword parameters and rejects a bad value, or
    (taking ``**options``) an unknown name, with ``ValueError`` or ``TypeError`` naming it. A method
    calls the loss once on small CPU float32 logits (``[2, 8]``, with labels) when it is built, so
    that a rejected option is a one-line config error before training; any other exception, there or
    during training, stops the run as a :class:`kdcore.plugins.PluginFault` naming the plugin.
    kd_loss's divergences are registered this way too (``forward_kl``, ``jsd``, ...), with kd_loss's
    keywords as their options.
    """


@hookspec
def kdcore_register_backends(register):
    """Register kernel backends.

    Call ``register(backend)`` with a :class:`kdcore.Backend` for each: the devices it runs on, its
    priority for ``backend="auto"``, the op it provides for each op family (``"kd_loss"``: a
    ``torch.library`` op or a callable with the family's schema), and a function saying why it is
    unavailable on this machine (or None). kdcore's own ``reference`` and ``cpp`` backends are
    registered through this hook too.
    """


@hookspec
def kdcore_register_models(register):
    """Register model architectures that run configs can name (``student: {model: NAME}``).

    Call ``register(name, factory, description="")`` for each. ``factory(**options)`` receives the
    spec's ``options`` and returns an ``nn.Module`` whose forward takes a batch's inputs (a tensor,
    or keyword arguments when the inputs are a mapping) and returns logits (a tensor, or an object
    with a ``logits`` attribute). An import path ``package.module:callable`` works in configs too.
    """


@hookspec
def kdcore_register_datasets(register):
    """Register datasets that run configs can name (``data: {dataset: NAME}``).

    Call ``register(name, factory, description="")`` for each. ``factory(**options)`` receives the
    config's ``data.options`` and returns a mapping with ``"train"`` and ``"val"`` map-style
    datasets. An item is ``(inputs, labels)``, or a mapping whose ``"labels"`` entry holds the
    labels and whose other entries are the model's keyword inputs. A factory that declares a
    ``tokenizers`` parameter also receives the tokenizers the run's models name (their
    ``tokenizer`` keys), as a dict by role (``"student"``, ``"teacher0"``, ...). A mapping item may
    carry ``label_bytes``, ``spans`` and ``teacher_view`` (the teachers' own tokenization of the
    same text) for distillation across tokenizers; see :class:`kdcore.engine.data.Batch`.
    """


@hookspec
def kdcore_register_callbacks(register):
    """Register named training callbacks.

    Call ``register(name, factory, description="")`` for each. When a run's config lists the name
    under ``callbacks``, the Distiller calls ``factory(options)`` with that entry's options (a
    dict) and registers the returned object as a plugin for the duration of the run, so its
    ``@kdcore.hookimpl`` methods receive the lifecycle hooks below.
    """


# -- lifecycle ------------------------------------------------------------------------------------


@hookspec
def kdcore_run_start(run):
    """Called once before the first stage, after the run's config is validated and any checkpoint
    it resumes from is loaded."""


@hookspec
def kdcore_run_end(run, metrics):
    """Called once after the last stage, with the final evaluation ``metrics`` (a dict of floats,
    empty if the run never evaluated)."""


@hookspec
def kdcore_stage_start(run, stage):
    """Called before a stage trains (also when a resumed run re-enters it). ``stage`` is the
    :class:`kdcore.Stage` about to run."""


@hookspec
def kdcore_stage_end(run, stage):
    """Called after a stage's last epoch, once its checkpoint is written."""


@hookspec
def kdcore_epoch_start(run, stage, epoch):
    """Called before each training epoch; ``epoch`` counts from 0 within the stage."""


@hookspec
def kdcore_epoch_end(run, stage, epoch):
    """Called after each training epoch, once its checkpoint is written."""


@hookspec
def kdcore_step_end(run, stage, step, losses):
    """Called after each optimizer step. ``step`` counts optimizer steps from 0 within the stage;
    ``losses`` maps each named loss term (``"kd"``, ``"ce"``, ..., and ``"total"``) to its value as
    a float, already averaged over gradient-accumulation micro-batches."""


@hookspec
def kdcore_evaluated(run, stage, epoch, metrics):
    """Called after each evaluation with its ``metrics``: a dict of floats such as ``accuracy``,
    ``teacher_agreement``, ``kl_to_teacher`` and ``ece``."""
