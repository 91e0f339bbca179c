"""Queue benchmark: our worker vs plain arq 0.28, Celery 5, SAQ 0.26 and streaQ 7 on the same Redis, one command,
one table.

    .venv/bin/python bench/queue.py                 # everything, 10,000 jobs per system (~13 min)
    .venv/bin/python bench/queue.py --jobs 2000 --only ours,arq-tuned
    .venv/bin/python bench/queue.py --jobs 2000 --only saq,streaq
    .venv/bin/python bench/queue.py --only ours --repeat 3 --py-spy    # where our worker's time goes

Needs Redis (default 127.0.0.1:6379, databases 12 and 13 are flushed) and PostgreSQL (default
postgres@127.0.0.1:5432; a scratch database `salesdash_bench_queue` is created, migrated and dropped), and the
`bench` extra (Celery). kombu 5.7 refuses redis-py < 6.1, which arq 0.28 needs: the Celery row then fails
with that message until kombu < 5.7 is installed (5.6.2 works).

SAQ and streaQ need other versions of the same libraries (SAQ: redis-py 7; streaQ: coredis and anyio), so each
runs in its own virtualenv at the repo root, `.venv-bench-saq/` (`saq[redis,hiredis]==0.26.*`, plus
typing_extensions, which saq 0.26.4 imports without declaring it) and `.venv-bench-streaq/` (`streaq>=7,<8`).
The bench creates them on first use (`python -m venv` + `pip install`, log in the log dir) and reuses them while
their `.bench-requirements` stamp matches. Their workers and their clients run with that venv's python: the
client is a helper process (`python -m bench._queue_saq` / `bench._queue_streaq`, protocol in
bench/_queue_client.py) that enqueues and runs the timed round trips; this script only reads Redis to see
unfinished jobs and stored results.

Systems (each worker is its own process, started by this script, stopped at the end even on error):
- `ours`         our SalesdashWorker (`arq bench._queue_ours.Settings`), max_jobs=20 like our real queues,
                 history to PostgreSQL (scratch database, migrated, dropped afterwards) and metrics on;
- `ours-100`     the same with max_jobs=100;
- `arq-default`  plain arq 0.28 (`arq bench._queue_arq.DefaultSettings`: max_jobs=10, poll_delay=0.5 s);
- `arq-tuned`    plain arq with max_jobs=100, poll_delay=0.01 s;
- `celery`       Celery 5, Redis broker (db N) and Redis result backend (db N+1), prefork, 2 processes,
                 --without-heartbeat --without-gossip --without-mingle;
- `saq`          SAQ 0.26 (`saq bench._queue_saq.settings`), concurrency=20 like our max_jobs, results kept 1 h,
                 stuck-job sweep every hour instead of 60 s (why: bench/_queue_saq.py), other timers default;
- `saq-100`      the same with concurrency=100;
- `streaq`       streaQ 7 (`streaq run bench._queue_streaq:worker`), concurrency=20, prefetch default (as many
                 again), results kept 1 h (task ttl);
- `streaq-100`   the same with concurrency=100.
Every worker logs at INFO (one or two lines per job) into a file; `--log-level WARNING` turns that off for all
of them (our SALESDASH_LOG_LEVEL, arq's logger, celery --loglevel, SAQ's CLI without -v, streaQ's per-task
`silent=True`). INFO is the default of all but SAQ's CLI (WARNING), which gets -v for the INFO runs.

Method, the same for every system, one system at a time on a FLUSHDB'd Redis database:
1. start the worker; warm up with 100 `ping` jobs and wait until they are done (this is also the readiness
   check, so import and connection time are never measured). SAQ only: the warm-up is enqueued once SAQ's
   startup sweep has run, since that sweep aborts jobs the starting worker has just taken;
2. idle Redis commands/s: wait 2.5 s, then count, with MONITOR, the commands sent on the bench databases over
   `--idle-seconds` (5 s). Only top-level commands count (not the ones a Lua script runs). MONITOR sees only
   the bench databases' traffic, so other users of the same Redis server do not distort it;
3. idle round trip: `--rtt` (200) sequential `ping` jobs, after 20 unrecorded ones: time from just before the
   enqueue call to the moment the client sees the job finished. Ours: enqueue_raw(notify_done=True) +
   wait_done (BLPOP, how `salesdash ... --wait` waits). arq: enqueue_job + Job.result(poll_delay=0.001);
   Celery: send_task + AsyncResult.get(interval=0.001) (Redis backend: pub/sub); SAQ: Queue.enqueue + Queue.job
   every 1 ms until the job is complete (SAQ's own waits: Queue.apply polls every 0.5 s by default, and the pushed
   Job.refresh(until_complete) subscribes only after reading the job, so it can miss a job finishing in between
   and then waits out its timeout); streaQ: task.enqueue() + Task.status() every 1 ms until DONE (its
   Task.result() costs >= 100 ms per call in coredis 6.9, see bench/_queue_streaq.py). The clients poll every
   1 ms (or are pushed) so the client is not what is measured. SAQ's and streaQ's round trips are timed inside
   their client process, so the pipe to this script is not measured either;
4. drain: freeze the worker's process group (SIGSTOP), enqueue `--jobs` `noop` jobs (batched, untimed), then
   release it (SIGCONT) and time from the release until every result exists in Redis: ours when the
   queue's sorted set (`salesdash:queue:bench`) is empty (a job leaves it in the Lua call that stores its
   result); arq when its
   queue sorted set is empty (same: arq removes a job from the queue in the transaction that stores its
   result); Celery when the result database holds all results (DBSIZE); SAQ when its `incomplete` sorted set is
   empty (left in the MULTI that stores the job as complete); streaQ when its stream is empty (XLEN: the entry is
   XDEL'd in the MULTI that stores the result) and nothing is delayed. Polled every 5 ms.
   jobs/s = jobs / drain seconds (the median drain with --repeat). Worker CPU (whole process group) and
   Redis server CPU over the drain are reported per job;
5. checks: the number of stored results is counted (SCAN; SAQ: job keys whose status is `complete`, since they
   exist from the enqueue on); for ours also `job_runs` rows in PostgreSQL and
   the `salesdash:metrics` success counter for `noop` must both reach the job count (waited for up to 60 s,
   the lag after the drain is shown), since the targets are "with history and metrics on".

This machine has 2 cores, often shared with other work: before each timed phase the bench waits (up to
--quiet-wait, 60 s) until other processes use < 25 % of a core, and it flags a drain during which they used
≥ 10 %. Redis CPU is the whole server's, so other clients of the same server add to it. `--py-spy` samples the
asyncio workers (ours, arq, SAQ, streaQ) during each drain (py-spy must be installed in .venv) and writes a
per-function summary; `--profile` runs them under cProfile instead.

streaQ keeps its Lua code as a server-wide Redis function library (`streaq`, FUNCTION LOAD, not per database):
after the streaQ rows the bench puts that library back as it found it (normally: deletes it).
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
