"""Running a node: ``app`` wires the parts and owns both listeners, ``runtime`` runs one process,
``workers`` and ``supervise`` run several, ``reload`` applies a new config, ``listeners`` binds sockets."""
