"""Staged rollouts: waves (``waves``), health gates (``gates``) and the pure state machine
that decides (``machine``). The IO around them (storage, publishing, the controller) builds
on these and never decides by itself."""
