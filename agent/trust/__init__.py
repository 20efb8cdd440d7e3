"""Trust on the device: the TUF client for bundles, signatures on desired states."""

from agent.contract import DIRECTOR_FIELD  # where the root names the director keys

__all__ = ["DIRECTOR_FIELD"]
