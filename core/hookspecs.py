"""The plugin contract: every hook a fastgen plugin may implement.

Registration hooks receive a `register` callback and call it once per class they provide
(or not at all, when their dependencies are missing). Observer hooks receive plain data and
return nothing; they serve metrics and logging plugins.
"""

import pluggy

hookspec = pluggy.HookspecMarker("fastgen")
hookimpl = pluggy.HookimplMarker("fastgen")


@hookspec
def register_models(register):
    """Called once when plugins load. Call `register(cls)` for each model class provided.

    `cls` must have `name` (str, the plugin name after `models.`), `architectures`
    (the Hugging Face `architectures` strings it serves) and implement `fastgen.model.ModelPlugin`.
    """


@hookspec
def register_kernels(register):
    """Called once when plugins load. Call `register(cls)` for each kernel backend provided.

    `cls` must have `name` (the plugin name after `kernels.`), a classmethod
    `unavailable_reason(device) -> str | None` and implement `fastgen.kernels.KernelBackend`.
    The engine builds it as `cls(device, cache_dir=config.cache_dir)` when its constructor takes
    `cache_dir` (a backend that builds or caches files keeps them there), else as `cls(device)`.
    """


@hookspec
def register_schedulers(register):
    """Called once when plugins load. Call `register(cls)` for each scheduler provided.

    `cls` must have `name` and implement `fastgen.scheduler.Scheduler`; it is built as
    `cls(config)` with the engine's `Config`.
    """


@hookspec
def register_transports(register):
    """Called once when plugins load. Call `register(cls)` for each transport provided.

    `cls` must have `name`; `cls(engine, config).run()` serves until the transport ends.
    """


@hookspec
def on_step_finished(engine, stats):
    """Called after every engine step with that step's `fastgen.engine.StepStats`."""


@hookspec
def on_request_finished(engine, output):
    """Called once per finished request with its final `fastgen.request.RequestOutput`."""
