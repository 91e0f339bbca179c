"""Job coroutines, one module per domain. Each takes arq's `ctx` first; ctx["db"] is the worker's asyncpg pool."""
