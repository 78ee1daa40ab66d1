"""Caduceus processor: runs the processing modules of ``processing/`` tasks in Docker containers.

``python -m processor --config PATH [--once]``; see ``docs/processor.md``. Modules:
:mod:`processor.service` (the loop, workers, signals), :mod:`processor.queue` (readiness,
priorities), :mod:`processor.execute` (one attempt: claim, run the steps, move or retry),
:mod:`processor.runtime` (one container run with mercure's contract and the safety defaults),
:mod:`processor.workspace` (the task folder's layout), :mod:`processor.routing`
(``__mercure_routing`` and notifications), :mod:`processor.settings`.
"""
