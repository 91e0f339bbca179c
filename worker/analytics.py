"""The `analytics` queue: `arq worker.analytics.Settings` starts a worker for it alone."""

from worker.engine import install_engine
from worker.jobs import dashboard, exports, reports, views
from worker.registry import Queue
from worker.settings import queue_settings

install_engine()  # arq's CLI builds its workers with our engine from here on
Settings = queue_settings(
    Queue.ANALYTICS,
    views.refresh_realtime_materialized_views,
    views.refresh_daily_materialized_views,
    views.refresh_all_materialized_views,
    reports.generate_monthly_report,
    exports.export_analytics_data,
    dashboard.warm_dashboard_cache,
)
