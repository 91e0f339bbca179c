"""The `notifications` queue: `arq worker.notifications.Settings` starts a worker for it alone."""

from worker.engine import install_engine
from worker.jobs import stock
from worker.registry import Queue
from worker.settings import queue_settings

install_engine()  # arq's CLI builds its workers with our engine from here on
Settings = queue_settings(Queue.NOTIFICATIONS, stock.check_low_stock_products)
