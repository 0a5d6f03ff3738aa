"""``mbcompile.tune``: MetaSchedule over a model's distinct kernels, into a database folder.

Kernels are measured on this machine, or with ``tracker="HOST:PORT", key="KEY"`` on the devices
registered with that TVM RPC tracker under KEY (MetaSchedule's RPC runner; each candidate is
cross-linked for the target here and uploaded).
"""

from __future__ import annotations

import functools
import os
import time
from collections.abc import Sequence
from typing import Any

from mbcompile.compiler import prepare
from mbcompile.errors import OptionError, RemoteError, TargetError
from mbcompile.options import CompileOptions

# A device's RPC server must have this (it is in TVM's libtvm_runtime_extra.so) for MetaSchedule.
RANDOM_FILL = "tvm.contrib.random.random_fill_for_measure"


def check_budget(trials: Any, minutes: Any, max_tasks: Any) -> None:
    """OptionError unless ``trials`` (and ``max_tasks``, if given) are positive integers and
    ``minutes``, if given, a positive number: checked before any model is loaded."""
    if minutes is not None and not (isinstance(minutes, (int, float)) and minutes > 0):
        raise OptionError(f"minutes must be a positive number (a time budget), got {minutes!r}")
    if not isinstance(trials, int) or isinstance(trials, bool) or trials < 1:
        raise OptionError(f"trials must be a positive integer, got {trials!r}")
    if max_tasks is not None and (not isinstance(max_tasks, int) or max_tasks < 1):
        raise OptionError(f"max_tasks must be a positive integer, got {max_tasks!r}")


def tune(
    model,
    *,
    work_dir: str | os.PathLike,
    target: Any = "host",
    max_seq_len: int | None = None,
    seq_len: int | None = None,
    batch_size: int = 1,
    num_choices: int | None = None,
    passes: str | Sequence[Any] | None = "default",
    logits_for: str = "all",
    max_masked: int = 8,
    mask_token_id: int | None = None,
    precision: str = "fp32",
    trials: int = 64,
    minutes: float | None = None,
    max_tasks: int | None = None,
    log=print,
    tracker: str | None = None,
    key: str | None = None,
    session_timeout: int | None = None,
    emulator_cost: str | None = None,
    runner=None,
    builder=None,
) -> dict:
    """Tune the kernels ``compile`` would build for this model and target into ``work_dir``.

    The options from ``target`` to ``precision`` are ``compile``'s
    (:class:`mbcompile.options.CompileOptions`): a database tuned with them applies to a compile
    with the same ones.

    The 24 layers share their kernels, so each distinct kernel is one task. ``trials`` is the
    budget per task, ``minutes`` an optional wall-clock budget; running again with the same
    ``work_dir`` resumes, each kernel getting only the trials it lacks. Ctrl-C stops the search
    within seconds and raises KeyboardInterrupt, leaving a valid database (a line of it torn by
    a kill is skipped with a warning, here and in ``compile``). Apply it with
    ``compile(..., tuning_db=work_dir)``. The search space holds the untuned schedules too, so a
    tuned kernel is never slower than an untuned one as measured. ``max_tasks`` tunes only the
    kernels with the most FLOPs per forward.

    ``tracker="HOST:PORT"`` with ``key``: measure on the devices registered with that TVM RPC
    tracker under ``key`` (their servers need ``--load-library`` of the device TVM's
    ``libtvm_runtime_extra.so``); ``target`` must be their CPU. Checked before anything is
    captured: RemoteError if the tracker cannot be reached, lists no device under ``key`` or its
    device cannot measure. ``session_timeout``: seconds a device may take per candidate (60).
    ``emulator_cost="a76"`` (or ``"a55"``, ``"instructions"``), for an aarch64 ``target``: cost
    each candidate on the emulated device (``mbcompile emulator build``) by the instructions it
    executes, counted under qemu, turned into a modelled core's cycles
    (``devices/emulator/cycle_models.py``; ``instructions``: their count), instead of by
    time. Wall time under qemu says nothing about a phone; the modelled cycles rank
    candidates by what they execute. Recorded as seconds at ``cycle_models.GHZ``. It is the
    default for an aarch64 target on a CPU that cannot run its code; any other target this CPU
    cannot run needs ``tracker=``/``key=`` (TargetError before anything is captured).
    ``runner``/``builder``: functions returning MetaSchedule objects of your own instead; the
    search runs in a process of its own, which calls them, so they must pickle (module-level
    functions, or ``functools.partial`` of one).
    """
    from mbcompile.devices.rpc import parse_address
    from mbcompile.targets.pipeline import fused_module
    from mbcompile.targets.rpc_tuning import SESSION_TIMEOUT, rpc_builder, rpc_runner
    from mbcompile.targets.tuning import Database, sigint_held, tune_module

    options = CompileOptions.pick(locals())
    check_budget(trials, minutes, max_tasks)

    measures = [name for name, given in (("tracker=/key=", tracker is not None or key is not None),
                                         ("emulator_cost=", emulator_cost is not None),
                                         ("runner=/builder=", runner is not None or builder is not None))
                if given]
    if len(measures) > 1:
        given = " and ".join(measures) if len(measures) == 2 else ", ".join(measures)
        raise OptionError(f"give one way to measure candidates, not {'both' if len(measures) == 2 else 'all of'} {given}")
    if not measures:
        emulator_cost = _default_measure(options, log)
    if emulator_cost is not None:
        emulator_dir = _check_emulator_cost(emulator_cost, options, log)
    if tracker is not None or key is not None:
        devices = _check_tracker(tracker, key)
    start = time.perf_counter()
    try:
        prepared = prepare(model, options)
        spec, tvm_target, mod = prepared.target, prepared.tvm_target, prepared.mod
        if tracker is not None:
            host, port = parse_address(tracker, "tracker")
            # Made in the tuning search process: functions that make them, which pickle.
            builder = functools.partial(rpc_builder, spec)
            runner = functools.partial(
                rpc_runner, host, port, key,
                session_timeout=session_timeout or SESSION_TIMEOUT,
                max_workers=devices,
                f_create_session=_runner_session,
            )
            log(f"tune: measuring on {devices} device(s) with key {key!r} from tracker {tracker}")
        if emulator_cost is not None:
            from mbcompile.devices.emulator.counting_runner import counting_runner

            builder = functools.partial(rpc_builder, spec)
            runner = functools.partial(counting_runner, emulator_cost, workers=2,
                                       emulator_dir=emulator_dir)
            log(f"tune: costing candidates by instructions counted on the emulated device "
                f"({emulator_cost})")
        db = Database.create(work_dir, tvm_target)
        with sigint_held():  # TVM passes calling Python: Ctrl-C takes effect after them
            fused = fused_module(mod, tvm_target, options.precision)
        summary = tune_module(
            fused, tvm_target, db, trials=trials, minutes=minutes, max_tasks=max_tasks, log=log,
            runner=runner, builder=builder,
        )
    except KeyboardInterrupt as err:
        if err.args:
            raise  # tune_module stopped the search and said so
        message = (f"tune: stopped by Ctrl-C before the search measured anything; run the same "
                   f"command again to tune into {work_dir}")
        raise KeyboardInterrupt(message) from None
    summary["seconds"] = round(time.perf_counter() - start, 1)
    summary["work_dir"] = str(db.path)
    if tracker is not None:
        summary["tracker"], summary["key"] = tracker, key
    if emulator_cost is not None:
        summary["emulator_cost"] = emulator_cost
    return summary


def _default_measure(options: CompileOptions, log) -> str | None:
    """How candidates are measured when no way is given: here (None) if this CPU runs the
    target's code; on the emulated device by counted instructions (``"a76"``) for an aarch64
    target on another CPU; TargetError naming the ways to measure otherwise (measuring here
    would fail every candidate and record nothing useful)."""
    from mbcompile.targets.registry import can_run_here, host_arch, host_features, resolve_target

    spec = resolve_target(options.target)
    if can_run_here(spec) is None:
        return None
    reason = (f"this machine is {host_arch()}" if spec.arch != host_arch() else
              f"this CPU lacks {[f for f in spec.features if f not in host_features()]}")
    if spec.arch == "aarch64":
        log(f"tune: {spec.name!r} code cannot run here ({reason}); costing candidates "
            f"by their instructions on the emulated device, as a Cortex-A76-class core's "
            f"modelled cycles (choose with emulator_cost= / --emulator-cost, or measure on "
            f"devices with tracker= and key=)")
        return "a76"
    raise TargetError(
        f"cannot tune for {spec.name!r} here: {reason}; measure on devices of that CPU with "
        f"tracker='HOST:PORT' and key='KEY' (--tracker, --key)"
    )


def _check_emulator_cost(cost: str, options: CompileOptions, log) -> str:
    """The built emulated device's folder, after checking that ``cost`` is known, the target is
    aarch64 and counting's tools are here (OptionError, TargetError, ToolchainError)."""
    from mbcompile.devices.emulator import build
    from mbcompile.devices.emulator.counting import build_plugin
    from mbcompile.devices.emulator.counting_runner import check_cost
    from mbcompile.targets.registry import resolve_target

    check_cost(cost)
    spec = resolve_target(options.target)
    if spec.arch != "aarch64":
        raise TargetError(
            f"emulator_cost counts aarch64 code; the target {spec.name!r} is {spec.arch} "
            f"(give target='aarch64' or 'aarch64-dotprod')"
        )
    build_plugin()
    return str(build(log=lambda line: log(f"tune: {line}")).directory)


def _check_tracker(tracker: str | None, key: str | None) -> int:
    """How many devices the tracker lists under ``key``, after one of them showed it can measure
    (has ``random_fill_for_measure``); RemoteError naming the problem otherwise."""
    from mbcompile.devices.rpc import check_device_options
    from mbcompile.devices.tracker import request_device, tracker_devices

    check_device_options(tracker=tracker, key=key)
    session, address = request_device(tracker, key, timeout=120, session_timeout=60)
    try:
        session.get_function(RANDOM_FILL)
    except AttributeError:
        raise RemoteError(
            f"the device {key!r} at {address} (from tracker {tracker!r}) cannot measure kernels: "
            f"its TVM RPC server lacks {RANDOM_FILL}; start it with --load-library "
            f"PATH/TO/tvm/lib/libtvm_runtime_extra.so (of the device's TVM; "
            f"`mbcompile emulator serve` adds it when given --tracker)"
        ) from None
    finally:
        del session  # ends the session: the device registers as free again
    return max(1, tracker_devices(tracker).get(key, {}).get("registered", 1))


def _runner_session(rpc_config):
    """MetaSchedule's ``f_create_session`` (in a runner worker process): a device from the
    tracker, waiting at most 10 minutes for one to be free instead of forever."""
    from mbcompile.devices.tracker import connect_tracker

    return connect_tracker(
        f"{rpc_config.tracker_host}:{rpc_config.tracker_port}",
        rpc_config.tracker_key,
        timeout=600,
        session_timeout=rpc_config.session_timeout_sec,
    )
