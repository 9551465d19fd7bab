"""The supervisor's restart schedule, stepped through with the fake clock and real (tiny) child processes."""

from __future__ import annotations

import io
import shutil
import signal
from pathlib import Path

from shoal.supervisor import Backoff, Child, Supervisor, describe_exit
from testbed.clock import FakeClock
from testbed.proc import catches_signal
from testbed.processes import wait_until


def test_backoff_doubles_from_1s_to_30s_and_starts_over_after_a_minute_up() -> None:
    backoff = Backoff()
    assert [backoff.delay(uptime=0.5) for _ in range(8)] == [1, 2, 4, 8, 16, 30, 30, 30]
    assert backoff.delay(uptime=59.9) == 30
    assert backoff.delay(uptime=60) == 1
    assert backoff.delay(uptime=3) == 2


def test_exit_status_names_the_signal() -> None:
    assert describe_exit(3) == "exited with status 3"
    assert describe_exit(-signal.SIGKILL) == "was killed by SIGKILL"
    assert describe_exit(-signal.SIGRTMIN - 1) == f"was killed by signal {signal.SIGRTMIN + 1}"


def _noticed_exit(supervisor: Supervisor, child: Child) -> bool:
    supervisor.poll()
    return child.process is None


def test_a_child_that_keeps_exiting_is_restarted_on_schedule_and_the_others_are_left_alone(tmp_path: Path) -> None:
    clock = FakeClock()
    report = io.StringIO()
    crash = tmp_path / "crash"
    crash.touch()
    sh, sleep = shutil.which("sh"), shutil.which("sleep")
    assert sh is not None and sleep is not None
    # It exits with status 3 at once while the file exists, and runs on once it is gone.
    script = f'echo started; test -e "{crash}" && exit 3; exec "{sleep}" 600'
    log = tmp_path / "flaky.log"
    supervisor = Supervisor(clock=clock, report=report)
    flaky = supervisor.start("flaky", [sh, "-c", script], {}, str(log))
    steady = supervisor.start("steady", [sleep, "600"], {}, str(tmp_path / "steady.log"))
    assert steady.process is not None
    steady_pid = steady.process.pid
    try:
        delays = []
        for _ in range(7):
            assert flaky.process is not None
            pid = flaky.process.pid
            wait_until(lambda: _noticed_exit(supervisor, flaky), message="the exit was never noticed")
            assert flaky.restart_at is not None
            delays.append(flaky.restart_at - clock())
            clock.advance(delays[-1] - 0.01)
            supervisor.poll()
            assert flaky.process is None, "restarted before its backoff had passed"
            if len(delays) == 7:
                crash.unlink()
            clock.advance(0.01)
            supervisor.poll()
            assert flaky.process is not None and flaky.process.pid != pid
        assert delays == [1, 2, 4, 8, 16, 30, 30]
        assert report.getvalue().count(f"shoal up: flaky exited with status 3 (log: {log}); restarting it in") == 7
        assert "shoal up: restarted flaky (pid " in report.getvalue()
        # Every run wrote to the same log.
        wait_until(lambda: log.read_text().count("started") == 8, message=lambda: log.read_text())

        # Up for a minute: healthy, so the next exit starts the schedule over.
        clock.advance(60)
        supervisor.poll()
        assert flaky.running() and flaky.process is not None
        flaky.process.kill()
        wait_until(lambda: _noticed_exit(supervisor, flaky), message="the kill was never noticed")
        assert flaky.restart_at == clock() + 1
        assert report.getvalue().endswith(f"flaky was killed by SIGKILL (log: {log}); restarting it in 1s\n")

        # Up for less than a minute: not healthy yet, the delay doubles.
        clock.advance(1)
        supervisor.poll()
        clock.advance(59)
        assert flaky.running() and flaky.process is not None
        flaky.process.kill()
        wait_until(lambda: _noticed_exit(supervisor, flaky), message="the kill was never noticed")
        assert flaky.restart_at == clock() + 2

        assert steady.process is not None and steady.process.pid == steady_pid and steady.running()
    finally:
        supervisor.stop()
    # Stopped while flaky waited out its backoff: nothing runs, and nothing starts later.
    assert steady.process is None and flaky.process is None
    clock.advance(100)
    supervisor.poll()
    assert flaky.process is None


def test_stop_ends_every_child_last_started_first(tmp_path: Path) -> None:
    sh = shutil.which("sh")
    assert sh is not None
    order = tmp_path / "order"
    supervisor = Supervisor()
    processes = []
    for name in ("redis", "coordinator-1", "node-1"):
        # Each writes its name when SIGTERM reaches it, then exits.
        script = f"trap 'echo {name} >> \"{order}\"; exit 0' TERM; while :; do sleep 0.05; done"
        child = supervisor.start(name, [sh, "-c", script], {}, str(tmp_path / f"{name}.log"))
        assert child.process is not None
        processes.append(child.process)
    wait_until(lambda: all(catches_signal(process.pid, signal.SIGTERM) for process in processes))
    supervisor.stop()
    supervisor.stop()
    assert order.read_text().split() == ["node-1", "coordinator-1", "redis"]
    assert all(process.returncode is not None for process in processes)
