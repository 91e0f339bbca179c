"""The entry points, the top layer: the `salesdash` CLI, `salesdash up` and the worker supervisor."""
