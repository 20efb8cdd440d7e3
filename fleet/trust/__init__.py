"""Trust on the fleet side: the TUF repository and the desired-state director."""
