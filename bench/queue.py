"""Queue benchmark: our worker vs plain arq 0.28 vs Celery 5 on the same Redis, one command, one table.

    .venv/bin/python bench/queue.py                 # everything, 10,000 jobs per system (~8 min)
    .venv/bin/python bench/queue.py --jobs 2000 --only ours,arq-tuned
    .venv/bin/python bench/queue.py --only ours --repeat 3 --py-spy    # where our worker's time goes

Needs Redis (default 127.0.0.1:6379, databases 12 and 13 are flushed) and PostgreSQL (default
postgres@127.0.0.1:5432; a scratch database `salesdash_bench_queue` is created, migrated and dropped), and the
`bench` extra (Celery). kombu 5.7 refuses redis-py < 6.1, which arq 0.28 needs: the Celery row then fails
with that message until kombu < 5.7 is installed (5.6.2 works).

Systems (each worker is its own process, started by this script, stopped at the end even on error):
- `ours`         our SalesdashWorker (`arq bench._queue_ours.Settings`), max_jobs=20 like our real queues,
                 history to PostgreSQL (scratch database, migrated, dropped afterwards) and metrics on;
- `ours-100`     the same with max_jobs=100;
- `arq-default`  plain arq 0.28 (`arq bench._queue_arq.DefaultSettings`: max_jobs=10, poll_delay=0.5 s);
- `arq-tuned`    plain arq with max_jobs=100, poll_delay=0.01 s;
- `celery`       Celery 5, Redis broker (db N) and Redis result backend (db N+1), prefork, 2 processes,
                 --without-heartbeat --without-gossip --without-mingle.
Every worker logs at its default INFO level (one or two lines per job) into a file; `--log-level WARNING`
turns that off for all of them (our SALESDASH_LOG_LEVEL, arq's logger, celery --loglevel).

Method, the same for every system, one system at a time on a FLUSHDB'd Redis database:
1. start the worker; warm up with 100 `ping` jobs and wait until they are done (this is also the readiness
   check, so import and connection time are never measured);
2. idle Redis commands/s: wait 2.5 s, then count, with MONITOR, the commands sent on the bench databases over
   `--idle-seconds` (5 s). Only top-level commands count (not the ones a Lua script runs). MONITOR sees only
   the bench databases' traffic, so other users of the same Redis server do not distort it;
3. idle round trip: `--rtt` (200) sequential `ping` jobs, after 20 unrecorded ones: time from just before the
   enqueue call to the moment the client sees the job finished. Ours: enqueue_raw(notify_done=True) +
   wait_done (BLPOP, how `salesdash ... --wait` waits). arq: enqueue_job + Job.result(poll_delay=0.001);
   Celery: send_task + AsyncResult.get(interval=0.001) (Redis backend: pub/sub). The clients poll every 1 ms
   (or are pushed) so the client is not what is measured;
4. drain: freeze the worker's process group (SIGSTOP), enqueue `--jobs` `noop` jobs (batched, untimed), then
   release it (SIGCONT) and time from the release until every result exists in Redis: ours when the ready
   and running sets are empty (results are stored in the same MULTI that leaves `running`); arq when its
   queue sorted set is empty (same: arq removes a job from the queue in the transaction that stores its
   result); Celery when the result database holds all results (DBSIZE). Polled every 5 ms.
   jobs/s = jobs / drain seconds (the median drain with --repeat). Worker CPU (whole process group) and
   Redis server CPU over the drain are reported per job;
5. checks: the number of stored results is counted (SCAN); for ours also `job_runs` rows in PostgreSQL and
   the `salesdash:metrics` success counter for `noop` must both reach the job count (waited for up to 60 s,
   the lag after the drain is shown), since the targets are "with history and metrics on".

This machine has 2 cores, often shared with other work: before each timed phase the bench waits (up to
--quiet-wait, 60 s) until other processes use < 25 % of a core, and it flags a drain during which they used
≥ 10 %. Redis CPU is the whole server's, so other clients of the same server add to it. `--py-spy` samples our
and arq's workers during each drain (py-spy must be installed in the venv) and writes a per-function summary;
`--profile` runs them under cProfile instead.
"""

from __future__ import annotations

import os
import sys

if __name__ == "__main__":
    # run as `python bench/queue.py`: bench/ is then sys.path[0] and this file would shadow the stdlib `queue`
    _here = os.path.dirname(os.path.abspath(__file__))
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _here]
    sys.path.insert(0, os.path.dirname(_here))
    from bench._queue_run import main

    sys.exit(main())
