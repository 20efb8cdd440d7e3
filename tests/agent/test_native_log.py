"""Native writes to fd 2 during a runtime call: INFO chatter becomes a debug log record,
anything else still reaches stderr, and stderr works normally afterwards."""

from __future__ import annotations

import logging
import os

from agent.runtime.native_log import native_stderr_to_log


def test_info_lines_are_logged_and_the_rest_still_reaches_stderr(capfd, caplog):
    log = logging.getLogger("test.native")
    with caplog.at_level(logging.DEBUG, logger="test.native"), native_stderr_to_log(log):
        os.write(2, b"INFO: Created TensorFlow Lite XNNPACK delegate for CPU.\n")
        os.write(2, b"ERROR: tensor 3 has no buffer\n")
    os.write(2, b"after\n")

    err = capfd.readouterr().err
    assert err == "ERROR: tensor 3 has no buffer\nafter\n"
    assert [r.getMessage() for r in caplog.records] == [
        "runtime: Created TensorFlow Lite XNNPACK delegate for CPU."
    ]


def test_stderr_is_restored_when_the_call_raises(capfd):
    try:
        with native_stderr_to_log(logging.getLogger("test.native")):
            os.write(2, b"WARNING: half-way\n")
            raise RuntimeError("load failed")
    except RuntimeError:
        pass
    os.write(2, b"after\n")
    assert capfd.readouterr().err == "WARNING: half-way\nafter\n"


def test_concurrent_loads_take_turns_and_stderr_survives(capfd):
    import threading
    import time

    log = logging.getLogger("test.native")
    start = threading.Barrier(4)

    def load(name: str) -> None:
        start.wait()
        for _ in range(20):
            with native_stderr_to_log(log):
                time.sleep(0.002)  # a load takes a while: the windows would overlap
                os.write(2, f"WARNING: {name}\n".encode())

    threads = [threading.Thread(target=load, args=(f"t{i}",)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    os.write(2, b"after\n")

    lines = capfd.readouterr().err.splitlines()
    assert lines[-1] == "after"
    assert sorted(set(lines[:-1])) == [f"WARNING: t{i}" for i in range(4)]
    assert len(lines) == 4 * 20 + 1
