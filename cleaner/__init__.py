"""Caduceus cleaner service: ``python -m cleaner --config PATH [--once]`` (``docs/cleaner.md``).

Deletes finished task folders so that the spool does not fill up:

* **retention** — during the off-peak window, task folders in ``success/`` and ``discard/`` that
  arrived more than ``retention`` seconds ago (mercure's behaviour), and in ``error/`` when the
  Caduceus setting ``error_retention`` is set;
* **emergency cleaning** — at any time of day, when the filesystem holding ``success/`` or
  ``discard/`` is used beyond ``emergency_clean_percentage``: the oldest tasks first, one at a
  time, only until the usage is back under the threshold (mercure deletes everything at once).

A folder holding ``.lock`` or ``.processing`` is never touched. A task is deleted by taking its
``.lock``, renaming the folder to the hidden ``.<task_id>.deleting`` and only then removing the
files, so that a crash never leaves half a task visible; leftovers are finished at the next pass.
"""
