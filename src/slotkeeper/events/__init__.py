"""Events: the slot and lifecycle events the server writes, the store, filters and live fan-out.

* ``models``: wire models (Prefect's Event, ReceivedEvent, EventFilter) and ``EventRecord``;
* ``builders``: the exact slot and lifecycle events (docs/events.md), as pure functions;
* ``filters``: one EventFilter, two evaluators: SQL for the store, Python for the live stream;
* ``broker``: fans committed events out to live subscribers with bounded queues.
"""
