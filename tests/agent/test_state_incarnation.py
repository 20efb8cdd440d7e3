"""The state file's incarnation: made with the file, kept across restarts, new after a wipe."""

from __future__ import annotations

import re
import shutil

from agent.contract import INCARNATION_PATTERN, StatusMessage, decode, encode, utcnow
from agent.state import AgentState, peek


def test_incarnation_is_kept_across_restarts_and_new_after_a_wipe(tmp_path):
    state_dir = tmp_path / "state"
    first = AgentState(state_dir)
    incarnation = first.incarnation
    first.next_seq()
    first.close()

    again = AgentState(state_dir)
    assert again.incarnation == incarnation
    assert peek(state_dir)["incarnation"] == incarnation
    again.close()

    shutil.rmtree(state_dir)  # re-flashed
    wiped = AgentState(state_dir)
    assert wiped.incarnation != incarnation
    wiped.close()


def test_messages_with_and_without_an_incarnation_are_valid(tmp_path):
    state = AgentState(tmp_path / "state")
    fields = {"device_id": "cam-1", "seq": state.next_seq(), "sent_at": utcnow(),
              "state": "online", "connection": 1}
    stamped = decode(StatusMessage, encode(StatusMessage(**fields,
                                                         incarnation=state.incarnation)))
    assert stamped.incarnation == state.incarnation
    assert re.search(INCARNATION_PATTERN, state.incarnation)
    # an agent from before the field sends none
    legacy = b'{"device_id":"cam-1","seq":5,"sent_at":"2026-01-01T00:00:00Z",' \
             b'"state":"online","connection":1}'
    assert decode(StatusMessage, legacy).incarnation is None
    state.close()
