"""The ground floor the programs share: the Control protocol's schema, the Control
client, configuration, logging, keys, the event-loop choice and the data-path relay
(``common.relay``).  It imports none of ``control``, ``gateway``, ``agent`` or the
``kakuremichi`` CLI above it; ``netstack`` is below it."""

__version__ = "0.1.0"
