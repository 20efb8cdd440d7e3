"""The device simulator (``edge-agent simulate``): many devices in one process, each
running the agent's real code (see :mod:`agent.simulate.device` for what is injected and
where, :mod:`agent.simulate.runner` for what is shared and why)."""
