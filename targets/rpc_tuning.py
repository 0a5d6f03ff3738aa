"""MetaSchedule measuring on remote devices: a builder that cross-links for a named target and a
runner that measures on devices registered with a TVM RPC tracker.

``tune_module(..., builder=partial(rpc_builder, spec), runner=partial(rpc_runner, host, port,
key))`` tunes on the devices the tracker hands out (``mbcompile tune --tracker HOST:PORT --key
KEY``); the tuning search process calls them.

- MetaSchedule's default export ships a tar of object files that the RPC server would link with
  its own compiler; a device has none (a phone) or the wrong one, so :func:`export_linked` links
  each candidate into a shared library with the target's compiler (``export.fcompile_for``:
  ``aarch64-linux-gnu-g++``, the NDK's clang) before it is uploaded.
- The runner fills the inputs with ``tvm.contrib.random.random_fill_for_measure``, which lives in
  the device TVM's ``libtvm_runtime_extra.so``: the device's RPC server must load it
  (``--load-library``; ``mbcompile emulator serve`` gets it from ``Emulator.tvm_library()``).

Both run in MetaSchedule's worker processes, started with ``tuning.worker_initializer`` (CPU
tensor intrinsics only) and given picklable module-level functions.
"""

from __future__ import annotations

import functools
import os
import tempfile

from mbcompile.targets.export import fcompile_for
from mbcompile.targets.metaschedule import (
    cold_cache_evaluator,
    local_builder,
    meta_schedule,
    worker_initializer,
)
from mbcompile.targets.registry import Target

ARTIFACT = "mbcompile_kernel.so"  # the name a candidate is uploaded under on the device
SESSION_TIMEOUT = 60  # seconds a device may take for one candidate (upload, load, measure)


def export_linked(target: dict, mod) -> str:
    """MetaSchedule ``f_export``: link a built candidate into a shared library for ``target``
    (a ``Target.to_dict()``), in a fresh temporary folder; returns its path."""
    fcompile = fcompile_for(Target.from_dict(target))
    path = os.path.join(tempfile.mkdtemp(prefix="mbcompile-candidate-"), ARTIFACT)
    if fcompile is None:
        mod.export_library(path)
    else:
        mod.export_library(path, fcompile=fcompile)
    return path


def rpc_builder(target: Target, *, max_workers: int | None = None, timeout_sec: float = 60.0):
    """MetaSchedule's LocalBuilder building each candidate as the compile does
    (``metaschedule.build_candidate``) and exporting it linked for ``target``.

    Raises ToolchainError now, not once per candidate, if the target's compiler is missing.
    """
    fcompile_for(target)
    return local_builder(
        max_workers=max_workers,
        timeout_sec=timeout_sec,
        f_export=functools.partial(export_linked, target.to_dict()),
    )


def rpc_runner(
    tracker_host: str,
    tracker_port: int,
    key: str,
    *,
    session_timeout: int = SESSION_TIMEOUT,
    max_workers: int = 1,
    f_create_session=None,
    evaluator=None,
):
    """MetaSchedule's RPCRunner on the devices registered with the tracker under ``key``.

    ``max_workers`` sessions at a time (one per device is the most that helps);
    ``f_create_session(rpc_config) -> RPCSession`` replaces TVM's, whose request for a device
    waits forever when none is free; ``evaluator``: a ``ms.runner.EvaluatorConfig``, by
    default ``cold_cache_evaluator()`` (as local tuning times candidates).
    """
    ms = meta_schedule()
    evaluator = evaluator or cold_cache_evaluator()
    return ms.runner.RPCRunner(
        rpc_config=ms.runner.RPCConfig(
            tracker_host=tracker_host,
            tracker_port=int(tracker_port),
            tracker_key=key,
            session_timeout_sec=int(session_timeout),
        ),
        evaluator_config=evaluator,
        f_create_session=f_create_session,
        max_workers=max_workers,
        initializer=worker_initializer,
    )
