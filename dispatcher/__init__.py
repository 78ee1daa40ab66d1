"""Caduceus dispatcher: sends the task folders of ``outgoing/`` to their targets.

``python -m dispatcher --config PATH [--once]``; see ``docs/dispatcher.md``. Modules:
:mod:`dispatcher.service` (the loop, workers, signals), :mod:`dispatcher.queue` (readiness,
priorities), :mod:`dispatcher.execute` (one attempt: claim, send, retry or move),
:mod:`dispatcher.targets` (the handler registry: ``dicom``, ``folder``, ``dummy``),
:mod:`dispatcher.echo` (the C-ECHO "test target" function for the GUI).
"""
