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
