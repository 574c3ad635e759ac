"""``scorekit.threads``: the ``--threads auto`` rule on synthetic step times (no clock, no thread
pool: ``cores``, ``load`` and ``apply`` are injected), pins, and the CLI's ``--threads`` values."""

from __future__ import annotations

import itertools
import json

import pytest
import torch

from scorekit.cli import build_parser, main
from scorekit.threads import ThreadPolicy, parse_threads, start_policy

TINY = json.dumps({"hidden": 16, "depth": 1, "emb_dim": 16})


@pytest.fixture(autouse=True)
def _no_env_pin(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)


def policy(cores=2, load=0.0, **kw):
    applied: list[int] = []
    p = ThreadPolicy("auto", cores=cores, load=load, apply=applied.append, **kw)
    p.start()
    return p, applied


def feed(p, seconds, times):
    for _ in range(times):
        p.step(seconds)


def past_first_probe(p, t_hi, t_lo):
    """A run started at 2 threads probes 1 thread after its first window; here that probe loses."""
    feed(p, t_hi, 3)
    assert p.threads == 1
    feed(p, t_lo, 3)
    assert p.threads == 2 and p._probe is None


def test_a_start_at_two_threads_probes_one_after_the_first_window():
    p, applied = policy()
    feed(p, 7.0, 3)  # collapsed from the first step: a competitor the start did not see
    assert applied == [2, 1]
    feed(p, 0.6, 3)
    assert p.threads == 1 and applied == [2, 1]


# -- the rule ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("cores", "load", "start", "lo"),
    [(2, 0.0, 2, 1), (2, 0.49, 2, 1), (2, 0.5, 1, 1), (2, 1.7, 1, 1), (8, 0.4, 8, 4), (8, 3.0, 4, 4),
     (1, 0.0, 1, 1)],
)  # fmt: skip
def test_start_is_all_cores_unless_the_load_says_a_core_is_taken(cores, load, start, lo):
    p, applied = policy(cores, load)
    assert (p.threads, p.lo, p.hi, applied) == (start, lo, cores, [start])


def test_slowdown_by_the_factor_probes_one_thread_and_keeps_it_when_faster():
    p, applied = policy()
    past_first_probe(p, 0.30, 0.45)
    feed(p, 0.30, 20)  # best median at 2 threads: 0.30 s
    feed(p, 0.44, 5)  # 1.47x: under the factor 1.5, no probe
    assert applied == [2, 1, 2]
    p.step(0.50)
    p.step(0.50)  # the median of the last 3 is 0.50 > 1.5 * 0.30: probe 1 thread
    assert applied == [2, 1, 2, 1] and p.threads == 1
    feed(p, 0.40, 2)
    assert p.threads == 1 and p._probe is not None  # a probe needs 3 steps unless one collapses
    p.step(0.40)  # median 0.40 < 0.50: the probe won
    assert p.threads == 1 and p._probe is None and applied == [2, 1, 2, 1]
    assert [why.split(" ")[1] for _, _, why in p.switches[2:]] == ["(slowed,", "won"]


def test_one_collapsed_step_is_enough_to_probe():
    p, applied = policy()
    past_first_probe(p, 0.30, 0.45)
    feed(p, 0.30, 10)
    p.step(7.0)  # > 3 x best in one step (the median still says 0.30)
    assert p.threads == 1
    feed(p, 0.60, 3)  # beats the 7 s step, not the old 0.30 s median
    assert p.threads == 1 and applied == [2, 1, 2, 1]


def test_a_slowdown_at_one_thread_waits_for_the_periodic_probe():
    p, applied = policy(load=1.0)  # busy at start: 1 thread
    feed(p, 0.5, 10)
    feed(p, 5.0, 4)  # more contention: 2 threads cannot help, so no probe now
    assert applied == [1]


def test_no_probe_up_while_another_task_is_runnable():
    running = [1.0]
    p, applied = policy(load=1.0, others=lambda: running[0])
    feed(p, 0.5, 400)  # 200 s: every 30 s the probe is due, but another task is running
    assert applied == [1]
    running[0] = 0.0  # it left: the next check, within one interval (60 steps of 0.5 s), probes
    feed(p, 0.5, 60)
    assert applied[:2] == [1, 2]  # (lost again: 2 threads are no faster here)


def test_a_probe_step_that_collapses_ends_the_probe_at_once_and_backs_off():
    p, applied = policy(load=1.0)  # busy at start: 1 thread
    assert applied == [1]
    feed(p, 0.6, 49)  # 29.4 s of step time
    assert applied == [1]
    p.step(0.6)  # 30 s: the periodic probe of 2 threads
    assert applied == [1, 2]
    p.step(13.0)  # collapsed (> 3 x 0.6): lost after one step
    assert applied == [1, 2, 1] and p._probe is None
    feed(p, 0.6, 99)  # the next probe waits 60 s of step time (doubled)
    assert applied == [1, 2, 1]
    p.step(0.6)
    assert applied == [1, 2, 1, 2]


def test_periodic_reprobe_recovers_the_speed_when_the_competitor_leaves():
    p, applied = policy()
    past_first_probe(p, 0.30, 0.45)
    feed(p, 0.30, 10)
    feed(p, 7.0, 1)  # a competitor arrives
    feed(p, 0.60, 3)  # 1 thread wins
    assert p.threads == 1
    feed(p, 0.45, 66)  # it leaves: 1 thread gets faster, which is no slow-down
    assert applied == [2, 1, 2, 1]
    feed(p, 0.45, 1)  # 30 s of step time since the probe: try 2 threads again
    assert applied == [2, 1, 2, 1, 2]
    feed(p, 0.30, 3)
    assert p.threads == 2 and applied == [2, 1, 2, 1, 2]


def test_a_lost_periodic_probe_returns_and_the_interval_doubles_up_to_the_cap():
    p, applied = policy(probe_every=3.0, max_probe_every=12.0)
    probes = []
    for i in range(400):
        before = len(applied)
        p.step(0.25 if p.threads == 2 else 0.5)  # 2 threads always faster: every probe loses
        if len(applied) > before and p.threads == 1:
            probes.append(i)
    assert p.threads == 2 and applied[-1] == 2
    # first after the first window; then 3 probe steps + 6, 12, 12 s of steps at 2 threads
    assert probes[0] == 2
    assert [b - a for a, b in itertools.pairwise(probes)][:4] == [3 + 24, 3 + 48, 3 + 48, 3 + 48]


def test_pins_never_change_the_count(monkeypatch):
    applied: list[int] = []
    p = ThreadPolicy(3, cores=2, load=0.0, apply=applied.append)
    p.start()
    for t in (0.3, 0.3, 0.3, 9.0, 9.0, 9.0) * 50:
        p.step(t)
    assert p.pinned and p.threads == 3 and applied == [3] and not p.switches
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # auto obeys an explicit environment pin
    assert ThreadPolicy("auto", cores=2, load=0.0).pinned
    assert ThreadPolicy("auto", cores=2, load=0.0).threads == 1
    assert ThreadPolicy(2, cores=2, load=0.0).threads == 2  # --threads N wins over the environment
    monkeypatch.setenv("OMP_NUM_THREADS", "junk")
    assert not ThreadPolicy("auto", cores=2, load=0.0).pinned


def test_auto_keeps_a_count_the_program_set_itself(monkeypatch):
    import scorekit.threads as threads

    monkeypatch.setattr(threads, "default_threads", lambda: 2)
    monkeypatch.setattr(threads, "_applied", None)
    torch.set_num_threads(1)  # as tests/conftest.py does: bitwise comparisons rely on it
    p = ThreadPolicy("auto", load=0.0, apply=[].append)
    assert p.pinned and p.threads == 1
    threads._set_num_threads(1)  # the same count set by scorekit.threads itself is no pin
    p = ThreadPolicy("auto", load=0.0, apply=[].append)
    assert not p.pinned and p.threads == 2


def test_none_keeps_torchs_current_count():
    torch.set_num_threads(1)
    p = start_policy(None)
    assert p.pinned and p.threads == 1 and torch.get_num_threads() == 1


# -- values and the command line -----------------------------------------------------------------


@pytest.mark.parametrize("value", ["auto", "AUTO", " auto ", None])
def test_parse_auto(value):
    assert parse_threads(value) == "auto"


@pytest.mark.parametrize(("value", "n"), [("1", 1), ("2", 2), (" 16 ", 16), (3, 3)])
def test_parse_integer(value, n):
    assert parse_threads(value) == n


@pytest.mark.parametrize("value", ["-1", "0", "1.5", "two", "", True])
def test_parse_bad_values(value):
    with pytest.raises(ValueError, match="--threads must be 'auto' or a whole number >= 1"):
        parse_threads(value)


@pytest.mark.parametrize("command", ["train", "sample", "demo"])
def test_cli_default_is_auto(command):
    extra = {"train": ["--out", "r"], "sample": ["--run", "r", "--n", "1", "--out", "x.npy"],
             "demo": []}[command]  # fmt: skip
    args = build_parser().parse_args([command, *extra])
    assert args.threads == "auto"
    assert build_parser().parse_args([command, *extra, "--threads", "2"]).threads == "2"


def test_cli_train_passes_auto_or_the_pin_to_train(monkeypatch, tmp_path):
    import scorekit.train.loop as loop

    seen = []

    def fake_train(cfg, **kw):
        seen.append(kw["threads"])
        raise ValueError("stop here")

    monkeypatch.setattr(loop, "train", fake_train)
    base = ["train", "--data", "moons", "--out", str(tmp_path / "r"), "--steps", "1"]
    assert main(base) == 2 and main([*base, "--threads", "2"]) == 2
    assert seen == ["auto", 2]


@pytest.mark.parametrize("command", ["train", "sample", "demo"])
def test_cli_bad_threads_is_one_line_before_any_work(command, tmp_path, capsys):
    out = tmp_path / "o"
    args = {
        "train": ["--data", "moons", "--out", str(out), "--steps", "1"],
        "sample": ["--run", str(tmp_path), "--n", "1", "--out", str(tmp_path / "x.npy")],
        "demo": ["--out", str(out)],
    }[command]
    assert main([command, *args, "--threads", "-1"]) == 2
    err = capsys.readouterr().err.strip()
    assert (
        err
        == f"scorekit {command}: error: --threads must be 'auto' or a whole number >= 1, got '-1'"
    )
    assert not out.exists()


def test_train_steps_the_policy_once_per_step(tmp_path):
    from scorekit.train import TrainConfig, train

    applied: list[int] = []
    p = ThreadPolicy("auto", cores=2, load=0.0, apply=applied.append)
    cfg = TrainConfig(data="moons", out=str(tmp_path / "r"), steps=7, batch=16, net=json.loads(TINY),
                      ckpt_every=100, log_every=100)  # fmt: skip
    train(cfg, progress=False, threads=p)
    assert p._steps == 7 and applied[0] == 2  # started, then fed one time per step
    torch.set_num_threads(1)
    train(TrainConfig(**{**cfg.to_dict(), "out": str(tmp_path / "s")}), progress=False)
    assert torch.get_num_threads() == 1  # the library default leaves the count alone
