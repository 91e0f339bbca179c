"""`salesdash worker <queue>`: a small process supervisor for one queue's arq workers.

It keeps `processes` children running, each `python -m worker <queue>` (our engine, built directly), and
- recycles a child after N jobs: the child is started with SALESDASH_MAX_JOBS_PER_PROCESS=N, stops claiming
  after N jobs, finishes them and exits 0, and a new child takes its place;
- replaces a child above a resident-memory limit: SIGTERM (the worker finishes its running jobs for up to
  SALESDASH_SHUTDOWN_TIMEOUT and hands back the rest), a replacement starts at once so capacity stays, and the
  old one is SIGKILLed if it is still there after the shutdown timeout + 10 s;
- restarts a child that died, with exponential backoff (1 s, 2 s, … capped at 30 s) while children keep
  crashing within a minute of starting;
- on SIGTERM/SIGINT forwards SIGTERM to every child, waits for them (same bound, then SIGKILL) and returns 0;
  a second signal forwards another SIGTERM, which makes workers hand back their jobs and stop now.

Children run in their own session, so a terminal's Ctrl-C reaches only the supervisor (a worker that got
SIGINT from the terminal and then our SIGTERM would take it as a second signal and skip the graceful wait),
and they get SIGTERM from the kernel if the supervisor dies without cleaning up (PR_SET_PDEATHSIG).
"""

from __future__ import annotations

import ctypes
import functools
import logging
import math
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from types import FrameType

import psutil

from salesdash.config import get_settings
from salesdash.logs import setup_logging

logger = logging.getLogger("salesdash.supervisor")

MAX_JOBS_ENV = "SALESDASH_MAX_JOBS_PER_PROCESS"  # read by worker.engine (not imported: it pulls in arq)
TICK_S = 0.2
MEMORY_CHECK_S = 1.0
KILL_AFTER_EXTRA_S = 10.0
BACKOFF_FIRST_S = 1.0
BACKOFF_MAX_S = 30.0
HEALTHY_AFTER_S = 60.0
_PR_SET_PDEATHSIG = 1


def _die_with_parent(parent_pid: int) -> None:
    """Runs in the child between fork and exec: ask the kernel for SIGTERM when the supervisor dies."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, int(signal.SIGTERM))
    except (OSError, AttributeError):
        return
    if os.getppid() != parent_pid:  # the supervisor died before prctl: no signal would ever come
        os.kill(os.getpid(), signal.SIGTERM)


def backoff_s(crashes: int) -> float:
    """Delay before the next start of a slot whose children crashed `crashes` times in a row (0: at once)."""
    return 0.0 if crashes <= 0 else min(BACKOFF_FIRST_S * 2 ** (crashes - 1), BACKOFF_MAX_S)


def rss_kb(pid: int) -> int | None:
    """Resident memory of a process in KiB; None when it is gone (or not ours to read)."""
    try:
        return int(psutil.Process(pid).memory_info().rss // 1024)
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return None


def describe_exit(code: int) -> str:
    if code < 0:
        try:
            return signal.Signals(-code).name
        except ValueError:
            return f"signal {-code}"
    return f"exit {code}"


def child_env(max_tasks_per_child: int, base: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ if base is None else base)
    if max_tasks_per_child > 0:
        env[MAX_JOBS_ENV] = str(max_tasks_per_child)
    else:
        env.pop(MAX_JOBS_ENV, None)  # 0 means never: an inherited value would recycle anyway
    return env


@dataclass
class Child:
    proc: subprocess.Popen[bytes]
    slot: int
    started: float  # time.monotonic()
    stop_reason: str | None = None  # set once we have sent SIGTERM
    kill_at: float = math.inf

    @property
    def pid(self) -> int:
        return self.proc.pid


@dataclass
class Slot:
    child: Child | None = None
    crashes: int = 0  # consecutive crashes of short-lived children
    start_at: float = 0.0  # monotonic time from which a new child may start
    replaces: int | None = None  # pid the next child replaces, for the log


@dataclass
class Supervisor:
    command: list[str]
    env: dict[str, str]
    processes: int
    max_tasks_per_child: int = 0
    max_memory_kb: int = 0
    shutdown_timeout_s: float = 30.0
    slots: list[Slot] = field(default_factory=list)
    retiring: list[Child] = field(default_factory=list)
    signals: list[int] = field(default_factory=list)
    next_memory_check: float = 0.0

    def __post_init__(self) -> None:
        self.slots = [Slot() for _ in range(self.processes)]

    # ---- main loop -------------------------------------------------------------------------------------
    def run(self) -> int:
        previous = {sig: signal.signal(sig, self._on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
        logger.info(
            "supervisor starting",
            extra={
                "command": " ".join(self.command),
                "processes": self.processes,
                "max_tasks_per_child": self.max_tasks_per_child,
                "max_memory_kb": self.max_memory_kb,
            },
        )
        try:
            while not self.signals:
                self.step()
                time.sleep(TICK_S)
            logger.info("supervisor stopping", extra={"signal": signal.Signals(self.signals[0]).name})
        finally:
            self.stop()
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        logger.info("supervisor stopped")
        return 0

    def _on_signal(self, signum: int, _: FrameType | None) -> None:
        self.signals.append(signum)  # no logging here: the main loop logs it

    def step(self) -> None:
        now = time.monotonic()
        self._reap(now)
        if self.max_memory_kb > 0 and now >= self.next_memory_check:
            self.next_memory_check = now + MEMORY_CHECK_S
            self._check_memory(now)
        self._kill_overdue(now)
        self._fill(now)

    # ---- starting ----------------------------------------------------------------------------------------
    def _fill(self, now: float) -> None:
        for index, slot in enumerate(self.slots):
            if slot.child is None and now >= slot.start_at:
                slot.child = self._spawn(index, now)
                logger.info("child started", extra={"pid": slot.child.pid, "slot": index, "replaces": slot.replaces})
                slot.replaces = None

    def _spawn(self, index: int, now: float) -> Child:
        proc = subprocess.Popen(
            self.command,
            env=self.env,
            start_new_session=True,
            preexec_fn=functools.partial(_die_with_parent, os.getpid()),
        )
        return Child(proc, index, now)

    # ---- exits -------------------------------------------------------------------------------------------
    def _reap(self, now: float) -> None:
        for slot in self.slots:
            child = slot.child
            code = None if child is None else child.proc.poll()
            if child is None or code is None:
                continue
            slot.child, slot.replaces = None, child.pid
            reason = self._settle_exit(slot, child, code, now)
            self._log_exit(child, code, reason, now)
            if slot.start_at > now:
                logger.warning(
                    "restarting child after backoff",
                    extra={"slot": child.slot, "delay_s": round(slot.start_at - now, 1), "crashes": slot.crashes},
                )
        still: list[Child] = []
        for child in self.retiring:
            code = child.proc.poll()
            if code is None:
                still.append(child)
            else:
                self._log_exit(child, code, child.stop_reason or "stopped", now)
        self.retiring = still

    def _settle_exit(self, slot: Slot, child: Child, code: int, now: float) -> str:
        """Why a child we did not stop exited, and when its slot may start the next one."""
        if code == 0 and self.max_tasks_per_child > 0:
            slot.crashes, slot.start_at = 0, now
            return f"recycled after {self.max_tasks_per_child} jobs"
        if now - child.started >= HEALTHY_AFTER_S:
            slot.crashes = 0
        slot.start_at = now + backoff_s(slot.crashes)
        slot.crashes += 1
        return "exited unexpectedly" if code == 0 else "crashed"

    def _log_exit(self, child: Child, code: int, reason: str, now: float) -> None:
        level = logging.WARNING if reason in ("crashed", "exited unexpectedly") else logging.INFO
        logger.log(
            level,
            "child exited",
            extra={
                "pid": child.pid,
                "slot": child.slot,
                "code": code,
                "how": describe_exit(code),
                "reason": reason,
                "lived_s": round(now - child.started, 1),
            },
        )

    # ---- stopping ----------------------------------------------------------------------------------------
    def _check_memory(self, now: float) -> None:
        for slot in self.slots:
            child = slot.child
            rss = None if child is None else rss_kb(child.pid)
            if child is None or rss is None or rss <= self.max_memory_kb:
                continue
            logger.warning(
                "child above memory limit; replacing it",
                extra={"pid": child.pid, "slot": child.slot, "rss_kb": rss, "limit_kb": self.max_memory_kb},
            )
            self._retire(child, f"memory {rss} KiB > {self.max_memory_kb} KiB", now)
            slot.child, slot.replaces, slot.start_at = None, child.pid, now

    def _retire(self, child: Child, reason: str, now: float) -> None:
        child.stop_reason = reason
        child.kill_at = now + self.shutdown_timeout_s + KILL_AFTER_EXTRA_S
        child.proc.send_signal(signal.SIGTERM)  # a no-op when it has already exited
        self.retiring.append(child)

    def _kill_overdue(self, now: float) -> None:
        for child in self.retiring:
            if now >= child.kill_at and child.proc.poll() is None:
                logger.warning(
                    "child did not stop in time; killing it",
                    extra={"pid": child.pid, "slot": child.slot, "reason": child.stop_reason},
                )
                child.proc.kill()
                child.kill_at = math.inf

    def stop(self) -> None:
        """SIGTERM every child, wait for all of them (SIGKILL after the bound); every further signal to the
        supervisor is forwarded again, which tells the workers to hand back their jobs and stop now."""
        now = time.monotonic()
        for slot in self.slots:
            if slot.child is not None:
                self._retire(slot.child, "supervisor stopping", now)
                slot.child = None
        forwarded = len(self.signals)
        while self.retiring:
            if len(self.signals) > forwarded:
                forwarded = len(self.signals)
                logger.info("signal again: telling children to stop now", extra={"children": len(self.retiring)})
                for child in self.retiring:
                    child.proc.send_signal(signal.SIGTERM)
            now = time.monotonic()
            self._reap(now)
            self._kill_overdue(now)
            if self.retiring:
                time.sleep(TICK_S)


def supervise(
    queue: str, processes: int, max_tasks_per_child: int, max_memory_per_child_kb: int, settings_path: str | None = None
) -> int:
    """Run `processes` workers of `queue` until SIGTERM/SIGINT; see the module docstring. Returns the exit
    code (0 after a clean stop). `settings_path` replaces `worker.<queue>.Settings` (tests)."""
    if processes < 1:
        raise ValueError("processes must be at least 1")
    settings = get_settings()
    if not logging.getLogger().handlers:
        setup_logging(settings.log_level, settings.log_json)
    supervisor = Supervisor(
        command=[sys.executable, "-m", "worker", settings_path or queue],  # not arq's CLI: no engine patch needed
        env=child_env(max_tasks_per_child),
        processes=processes,
        max_tasks_per_child=max(max_tasks_per_child, 0),
        max_memory_kb=max(max_memory_per_child_kb, 0),
        shutdown_timeout_s=float(settings.shutdown_timeout),
    )
    return supervisor.run()


__all__: list[str] = ["Supervisor", "backoff_s", "child_env", "rss_kb", "supervise"]
