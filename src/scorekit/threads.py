"""How many torch CPU threads to use when the machine may be shared: ``--threads auto``.

Why: torch's OpenMP threads wait for each other at the end of every parallel region by spinning.
When another process holds one of the cores, a thread that still has work is descheduled while its
partner spins, and every operation waits for a time slice. Measured on a 2-core machine with the
digits U-Net of ``scorekit bench train`` (batch 64):

=================================================  ========  =========
steps/s                                            1 thread  2 threads
=================================================  ========  =========
idle machine (a colleague's run)                      2.2       3.4
next to 1 busy process (a colleague's run)            2.2       1.0
1-min load 3-4 from others' tests (10 s each)         1.79      0.14
the same plus 1 busy process                          1.02      0.077
``bench train --contention``, load 5-6, 25 s each     1.2-1.7   0.17-0.50
=================================================  ========  =========

A collapsed 2-thread step took 7-17 s against 0.6-1 s on 1 thread. With ``OMP_WAIT_POLICY=PASSIVE``
(threads sleep instead of spinning) 2 threads did not collapse (0.9 and 2.8 steps/s against 1.0
and 0.7 on 1 thread, at load 6), but that must be set before torch is loaded, so it is not a
run-time choice; its cost on an idle machine is unmeasured.

So the right count is "all cores" on an idle machine and fewer as soon as something else runs,
and either can become true in the middle of a run. ``torch.set_num_threads`` takes effect at once,
so the policy below measures and switches.

The rule (``ThreadPolicy``, fed the seconds of each training step, host clock only):

* Counts: ``hi`` = torch's default, the physical cores this process may run on,
  ``lo = max(1, hi // 2)`` (1 on 2 cores).
  Start at ``hi`` unless other work holds cores: ``L`` = the tasks runnable right now
  (``/proc/loadavg``, median of 5 reads 20 ms apart); ``L >= 0.5`` starts at ``lo``. Not the
  1-minute load average: it lags by a minute, so a machine that was busy a moment ago (a previous
  run, a build) would start a training alone on ``lo`` (measured: 4.3 steps/s against 7.0 on
  ``hi``, idle, load average 0.7 left over); a competitor the instant read misses is caught by the
  probe after the first window.
* Settled at count ``n``: keep the last ``window`` (3) step times; their median ``m`` is the
  current speed and ``best[n]`` the smallest ``m`` seen at ``n``. If ``m > factor * best[n]``
  (1.5: noise on a busy machine reached 1.4x between the 10th and 90th percentile step), or the
  last step alone took over ``abort * best[n]`` (3; a collapse is 10x, so it is seen in one step),
  the machine changed: at ``hi``, probe ``lo`` now (at ``lo`` a slow-down means more
  contention, which more threads cannot help: it waits for the periodic probe). Otherwise probe it every ``probe_every`` seconds of
  step time (30 s, doubled after each lost probe up to 480 s, back to 30 s after a won one), so a
  run that dropped to ``lo`` returns to ``hi`` when the competitor leaves. A probe up from ``lo``
  is made only if no other task is runnable at that moment (median of 5 reads of
  ``/proc/loadavg``, 80 ms every 30 s); else it waits another interval: on a busy machine probing
  ``hi`` cost one collapsed step of 13-17 s each time (measured at load 6). A run started at
  ``hi`` probes ``lo`` once right after its first window, in case the start missed a competitor
  (its steps would be collapsed from the first, so no slow-down would show): ~3 steps at 1.5x
  on an idle machine.
* A probe runs up to ``window`` steps at the other count and wins if their median is below ``m``
  (the settled median just before it; after a one-step trigger, that step's time if larger).
  A probe step longer than ``abort * m`` (3x; a collapse is 10x) ends the probe at once as lost:
  trying the collapsed count costs one step.
* After the probe, settle at the winner with a fresh window; a lost probe also resets
  ``best[n]`` to ``m`` so a machine that stays slower at both counts does not re-trigger.

Cost: one ``time.perf_counter`` pair and a median of 3 floats per step; a lost probe costs one or
two steps at the worse count each ``probe_every`` (at most ~3% once backed off to 480 s, with a
13 s collapsed step). Limits: two counts only, so on a machine with many cores and one competitor
it settles at half the cores; changing the thread count mid-run changes float rounding, so a
run resumed with ``auto`` matches an uninterrupted one only to rounding; pin ``--threads`` (or
``OMP_NUM_THREADS`` or ``torch.set_num_threads``, which ``auto`` obeys) for bitwise-reproducible
training.
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable

import torch

__all__ = ["ThreadPolicy", "parse_threads", "start_policy", "start_threads", "usable_cores"]

ENV = "OMP_NUM_THREADS"
_applied: int | None = None  # the count this module last gave torch.set_num_threads


def _set_num_threads(n: int) -> None:
    global _applied
    _applied = n
    torch.set_num_threads(n)


def usable_cores() -> int:
    """The number of CPUs this process may run on (its affinity mask), at least 1."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # pragma: no cover - platforms without affinity
        return max(1, os.cpu_count() or 1)


def default_threads() -> int:
    """torch's own default count: the physical cores (distinct ``(package, core)`` pairs of sysfs)
    among the CPUs this process may run on, as MKL counts them; ``usable_cores()`` without sysfs."""
    try:
        cpus = os.sched_getaffinity(0)
        topo = "/sys/devices/system/cpu/cpu{}/topology/{}"
        cores = set()
        for c in cpus:
            with (
                open(topo.format(c, "physical_package_id")) as f,
                open(topo.format(c, "core_id")) as g,
            ):
                cores.add((f.read().strip(), g.read().strip()))
        return max(1, len(cores))
    except (AttributeError, OSError, ValueError):
        return usable_cores()


def _caller_pin() -> int | None:
    """torch's current count if this program set it (``torch.set_num_threads``), not scorekit."""
    n = torch.get_num_threads()
    return None if n in (default_threads(), _applied) else n


def load_average() -> float:
    """The 1-minute load average (0 where the platform has none)."""
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):  # pragma: no cover
        return 0.0


def running_now(samples: int = 5, gap: float = 0.02) -> float:
    """Other tasks runnable right now: the median over ``samples`` reads, ``gap`` s apart, of
    ``/proc/loadavg``'s runnable count less this reader (0 where there is no such file)."""
    counts = []
    for i in range(samples):
        try:
            with open("/proc/loadavg") as f:
                counts.append(int(f.read().split()[3].split("/")[0]) - 1)
        except (OSError, ValueError, IndexError):
            return 0.0
        if i + 1 < samples:
            time.sleep(gap)
    return float(statistics.median(counts))


def parse_threads(value: object) -> int | str:
    """``"auto"`` or a thread count ``>= 1`` from a command-line value; a one-line ValueError else."""
    if value is None or (isinstance(value, str) and value.strip().lower() == "auto"):
        return "auto"
    try:
        n = int(str(value).strip())
    except ValueError:
        n = 0
    if n < 1 or isinstance(value, bool):
        raise ValueError(f"--threads must be 'auto' or a whole number >= 1, got {value!r}")
    return n


def _env_pin() -> int | None:
    """The thread count ``OMP_NUM_THREADS`` pins, if it is set to a whole number >= 1."""
    try:
        n = int(os.environ.get(ENV, "").strip())
    except ValueError:
        return None
    return n if n >= 1 else None


class ThreadPolicy:
    """Choose torch's CPU thread count and adapt it to measured step times; see the module doc.

    ``ThreadPolicy("auto")`` adapts, unless the count is pinned elsewhere: ``OMP_NUM_THREADS`` set,
    or torch's count already changed in this process by ``torch.set_num_threads`` (not by this
    module), e.g. by a test suite; then it keeps that count.
    ``ThreadPolicy(4)`` pins 4; ``ThreadPolicy(None)`` pins torch's current count (changes
    nothing). ``cores``, ``load``, ``apply`` and ``others`` are for tests: the policy then touches
    no clock, no ``/proc`` and no thread pool. Call ``start()`` once, then ``step(seconds)`` after each training step.
    """

    def __init__(
        self,
        spec: int | str | None = "auto",
        *,
        cores: int | None = None,
        load: float | None = None,
        window: int = 3,
        factor: float = 1.5,
        abort: float = 3.0,
        probe_every: float = 30.0,
        max_probe_every: float = 480.0,
        apply: Callable[[int], None] | None = None,
        others: Callable[[], float] | None = None,
    ):
        spec = parse_threads(spec) if spec is not None else None
        self._apply = apply if apply is not None else _set_num_threads
        if others is None:  # injected cores (tests): no /proc reads unless asked for
            others = running_now if cores is None else (lambda: 0.0)
        self._others = others
        self.window, self.factor, self.abort = window, factor, abort
        self.probe_every0, self.max_probe_every = probe_every, max_probe_every
        pin = spec
        if spec == "auto":  # an explicit pin elsewhere wins: OMP_NUM_THREADS, torch.set_num_threads
            pin = _env_pin() or (_caller_pin() if cores is None else None)
        elif spec is None:
            pin = torch.get_num_threads()
        self.pinned = pin is not None
        if self.pinned:
            self.hi = self.lo = self.threads = int(pin)
        else:
            self.hi = default_threads() if cores is None else max(1, int(cores))
            self.lo = max(1, self.hi // 2)
            load = running_now() if load is None else load
            self.threads = self.hi if load < 0.5 else self.lo
        self.initial = self.threads
        self.best: dict[int, float] = {}
        self.switches: list[tuple[int, int, str]] = []  # (step, new count, why)
        self._times: list[float] = []
        self._probe: list[float] | None = None  # step times of a probe in progress
        self._settled_m = 0.0  # the settled median the probe is compared with
        # started at hi: probe lo after the first window (the start may have missed a competitor)
        self._since_probe = probe_every if self.threads == self.hi else 0.0
        self._probe_every = probe_every
        self._steps = 0

    @property
    def adaptive(self) -> bool:
        return not self.pinned and self.hi != self.lo

    def start(self) -> int:
        """Set torch's thread count to the starting choice; returns it."""
        if not (self.pinned and self.threads == torch.get_num_threads()):
            self._apply(self.threads)
        return self.threads

    def _switch(self, n: int, why: str) -> None:
        self.threads = n
        self._times = []
        self._apply(n)
        self.switches.append((self._steps, n, why))

    def step(self, seconds: float) -> int:
        """Record one training step's seconds; maybe change the thread count; returns the count."""
        self._steps += 1
        if not self.adaptive:
            return self.threads
        other = self.lo if self.threads == self.hi else self.hi
        if self._probe is not None:
            return self._probe_step(seconds, other)
        self._since_probe += seconds
        self._times = [*self._times, seconds][-self.window :]
        if len(self._times) < self.window:
            return self.threads
        m = statistics.median(self._times)
        best = self.best.setdefault(self.threads, m)
        # a slow-down only sends hi down: at lo, more threads cannot help a busier machine
        slowed = self.threads == self.hi and (m > self.factor * best or seconds > self.abort * best)
        self.best[self.threads] = min(best, m)
        due = not slowed and self._since_probe >= self._probe_every
        if due and self.threads == self.lo and self._others() >= 0.5:
            self._since_probe = 0.0  # hi would share a core with the others running now: not yet
            return self.threads
        if slowed or due:
            # the speed to beat: after a one-step slow-down, that step (the median still holds the past)
            self._settled_m = max(m, seconds) if slowed else m
            self._probe, self._since_probe = [], 0.0
            self._switch(other, f"probe ({'slowed' if slowed else 'periodic'}, median {m:.3g} s)")
        return self.threads

    def _probe_step(self, seconds: float, back: int) -> int:
        """A step of a probe at ``self.threads``; ``back`` is the settled count it is tested against."""
        self._probe.append(seconds)
        m0 = self._settled_m
        collapsed = seconds > self.abort * m0
        if not collapsed and len(self._probe) < self.window:
            return self.threads
        pm = statistics.median(self._probe)
        self._probe = None
        if not collapsed and pm < m0:  # won: stay, probe again soon
            self._probe_every = self.probe_every0
            self.best[self.threads] = pm
            self._times = []
            self.switches.append(
                (self._steps, self.threads, f"probe won ({pm:.3g} s < {m0:.3g} s)")
            )
        else:  # lost: back off
            self._probe_every = min(2 * self._probe_every, self.max_probe_every)
            self.best[back] = m0
            self._switch(back, f"probe lost ({pm:.3g} s >= {m0:.3g} s)")
        return self.threads


def start_threads(spec: int | str | None = "auto") -> int:
    """A fixed choice at start (``scorekit sample``, ``scorekit demo``): pinned, or ``hi``/``lo`` by
    the load average as ``ThreadPolicy`` starts; sets torch's count and returns it."""
    return ThreadPolicy(spec).start()


def start_policy(spec: ThreadPolicy | int | str | None) -> ThreadPolicy:
    """``spec`` as a started ``ThreadPolicy`` (what ``scorekit.train.train(threads=...)`` uses):
    a policy is started as it is; ``None`` keeps torch's current count; else ``ThreadPolicy(spec)``."""
    policy = spec if isinstance(spec, ThreadPolicy) else ThreadPolicy(spec)
    policy.start()
    return policy
