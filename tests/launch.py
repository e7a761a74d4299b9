"""Running a multi-process job from a test: in a session of its own, killed whole if it hangs."""

import os
import signal
import subprocess

import pytest


def run_job(command, cwd, timeout_s, what, env=None):
    """Run ``command``; return its output, or fail the test if it fails or runs past ``timeout_s``.

    The job starts a session of its own, so that a hung one is killed together with every process
    it started (a launcher's ranks included), not only the launcher.

    Args:
        command: The argument list to run.
        cwd: Its working directory.
        timeout_s: Seconds it may take.
        what: What the job is, for the failure messages.
        env: Its environment (default: this process's).

    Returns:
        Its standard output and standard error, interleaved.
    """
    process = subprocess.Popen(
        command,
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        output, _ = process.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        output, _ = process.communicate()
        pytest.fail(f"{what} ran past {timeout_s} s and was killed:\n{output[-4000:]}")
    if process.returncode != 0:
        pytest.fail(f"{what} failed with exit code {process.returncode}:\n{output[-4000:]}")
    return output
