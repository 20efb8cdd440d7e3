"""Trust on the device: the TUF client for bundles, signatures on desired states."""

DIRECTOR_FIELD = "x-edgefleet-director"

__all__ = ["DIRECTOR_FIELD"]
