"""``longdiff-worker``: the remote worker that runs jobs for Slicer panels and ``longdiff --remote``.

A FastAPI application (:mod:`.app`) in front of a job store on disk (:mod:`.store`: SQLite
plus files under ``--data``). Jobs run with the library's own
:func:`~LongitudinalDiffusionLib.jobs.run_job`, either on the worker's own GPU(s), one job
per GPU in submission order (:mod:`.runner`), or on separate GPU machines that share one
Celery queue on Redis (:mod:`.celery_app`). See docs/worker.md for deployment and security.
"""

#: The HTTP API's version. A client refuses a worker with another major version.
API_VERSION = "1.0"
