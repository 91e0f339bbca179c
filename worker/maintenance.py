"""The `maintenance` queue: `arq worker.maintenance.Settings` starts a worker for it alone."""

from worker.engine import install_engine
from worker.jobs import exports, health, history, lifetime_values, partitions, retention, segments
from worker.registry import Queue
from worker.settings import queue_settings

install_engine()  # arq's CLI builds its workers with our engine from here on
Settings = queue_settings(
    Queue.MAINTENANCE,
    history.prune_job_history,
    exports.prune_exports,
    segments.update_customer_segments,
    partitions.clean_old_order_partitions,
    partitions.create_order_partitions,
    retention.prune_old_records,
    lifetime_values.update_customer_lifetime_values,
    health.check_system_health,
)
