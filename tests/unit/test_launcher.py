"""The launcher's bounded shutdown, on stand-in children that ignore SIGTERM (no Redis, no models).

``alignq run`` itself is interrupted in tests/integration/test_run_cli.py; these pin the two phases and
the deadline down directly: a child that will not stop is killed with its process group when the grace
period ends, a second Ctrl-C ends the grace period at once, and ``bound_shutdown`` ends a hung shutdown.
"""

from __future__ import annotations

import os
import pathlib
import signal
import subprocess
import sys
import textwrap
import threading
import time

from middleware.runtime.launcher import KILL_TIMEOUT_S, ChildProcess, Launcher

UNUSED_REDIS = "redis://127.0.0.1:1/0"  # given, so no embedded Redis is started
STUBBORN = textwrap.dedent("""
    import signal, subprocess, sys, time
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    grandchild = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    print(grandchild.pid, flush=True)
    time.sleep(120)
""")


def stubborn_child(launcher: Launcher, name: str) -> tuple[ChildProcess, int]:
    """A child in a session of its own (as Launcher.start makes them) that ignores SIGTERM and has a
    child of its own; returns it and the grandchild's pid."""
    process = subprocess.Popen([sys.executable, "-c", STUBBORN], stdout=subprocess.PIPE, text=True,
                               start_new_session=True)
    grandchild = int(process.stdout.readline())  # SIGTERM is ignored from here on
    process.stdout.close()
    child = ChildProcess(name, process, os.devnull)
    launcher.children[name] = child
    return child, grandchild


def is_running(pid: int) -> bool:
    try:
        state = pathlib.Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
    except OSError:
        return False
    return state != "Z"


def test_a_child_ignoring_sigterm_is_killed_with_its_group_when_the_grace_period_ends() -> None:
    with Launcher(UNUSED_REDIS, stop_timeout_s=0.5) as launcher:
        child, grandchild = stubborn_child(launcher, "stubborn")
        started = time.monotonic()
    assert time.monotonic() - started < 0.5 + KILL_TIMEOUT_S
    assert child.process.returncode == -signal.SIGKILL
    give_up_at = time.monotonic() + 5  # the grandchild is reparented, then reaped by init
    while is_running(grandchild) and time.monotonic() < give_up_at:
        time.sleep(0.05)
    assert not is_running(grandchild)


def test_a_second_ctrl_c_ends_the_grace_period_and_does_not_abandon_the_stop() -> None:
    before = signal.getsignal(signal.SIGINT)

    def interrupt_once_stopping() -> None:  # only once the stop listens: a KeyboardInterrupt would end pytest
        give_up_at = time.monotonic() + 10
        while signal.getsignal(signal.SIGINT) is before and time.monotonic() < give_up_at:
            time.sleep(0.005)
        os.kill(os.getpid(), signal.SIGINT)

    with Launcher(UNUSED_REDIS, stop_timeout_s=60) as launcher:
        child, _ = stubborn_child(launcher, "stubborn")
        threading.Thread(target=interrupt_once_stopping, daemon=True).start()
        started = time.monotonic()
    assert time.monotonic() - started < 10  # not the 60 s grace period
    assert child.process.returncode == -signal.SIGKILL
    assert signal.getsignal(signal.SIGINT) is before


def test_bound_shutdown_kills_the_children_and_exits_when_the_shutdown_hangs(tmp_path: pathlib.Path) -> None:
    script = textwrap.dedent(f"""
        import sys, time
        sys.path.insert(0, {str(pathlib.Path(__file__).parent)!r})
        from middleware.runtime.launcher import Launcher, bound_shutdown
        from test_launcher import UNUSED_REDIS, stubborn_child
        with Launcher(UNUSED_REDIS, stop_timeout_s=60) as launcher:
            child, grandchild = stubborn_child(launcher, "stubborn")
            print(child.process.pid, grandchild, flush=True)
            bound_shutdown(launcher, 0.5, exit_code=7)
            time.sleep(120)  # a shutdown step that never returns
    """)
    process = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    pids = [int(pid) for pid in process.stdout.readline().split()]
    process.stdout.close()
    assert process.wait(timeout=0.5 + KILL_TIMEOUT_S + 10) == 7
    give_up_at = time.monotonic() + 5
    while any(is_running(pid) for pid in pids) and time.monotonic() < give_up_at:
        time.sleep(0.05)
    assert not any(is_running(pid) for pid in pids)
