"""gunicorn settings the node always runs with; the CLI passes the rest."""

import os
import shutil

from gunicorn.glogging import CONFIG_DEFAULTS

# Set by ``shoal node``; prometheus-client's multiprocess mode reads it.
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"

# gevent workers with the node's zero-copy socket and ceilings (node/serving.py).
worker_class = "node.serving.Worker"
# sendfile is on by default; gunicorn's ``sendfile`` setting can only turn
# it off (any value but None disables it), so it is deliberately not set.
# Blob downloads are long; a worker's liveness is its heartbeat, not how
# long one request takes (the worker's main greenlet beats while others stream).
timeout = 60
graceful_timeout = 30
# Only a switch here: the worker bounds the wait for a request head,
# keep-alive included, by server.header_timeout.
keepalive = 15
# Several nodes may run on one machine (``shoal up``); gunicorn's control
# socket has one fixed path per user, so the nodes would fight over it.
control_socket_disable = True
accesslog = "-"
errorlog = "-"
# gunicorn's logger, with the access log written by a thread of each
# worker's own through a bounded queue, off the request path (node/access_log.py).
logger_class = "node.access_log.Logger"
# No query string in the access log: the request line is enough, and it
# keeps anything a client put there out of the log.
access_log_format = '%(h)s "%(m)s %(U)s" %(s)s %(B)s %(M)sms'
# The node's own loggers write beside gunicorn's, to stderr. gunicorn
# replaces its default sections with these, so they are merged here.
logconfig_dict = {
    **CONFIG_DEFAULTS,
    "loggers": {
        # gunicorn's defaults pass its lines on to the root logger too, which
        # would print each of them twice.
        **{name: {**spec, "propagate": False} for name, spec in CONFIG_DEFAULTS["loggers"].items()},
        "node": {"level": "INFO", "handlers": ["error_console"], "propagate": False},
        # httpx logs every request at INFO, URLs and all: the access log and
        # the node's own warnings say what an operator needs.
        "httpx": {"level": "WARNING"},
        "httpcore": {"level": "WARNING"},
    },
}


def post_worker_init(worker):
    """Start the worker's access log writer; dropped lines count in the node's metrics."""
    node = _node(worker)
    start_writer = getattr(worker.log, "start_writer", None)
    if start_writer is not None:
        start_writer(node.metrics if node is not None else None)


def worker_exit(server, worker):
    """Write the queued access log lines, then stop the node's background threads and close its clients.

    gunicorn also calls this in the master for a worker that vanished; there
    the node is not loaded and the writer was never started, so both are no-ops.
    """
    stop_writer = getattr(worker.log, "stop_writer", None)
    if stop_writer is not None:
        stop_writer()
    node = _node(worker)
    if node is not None:
        node.close()


def _node(worker):
    app = getattr(worker, "wsgi", None)
    return getattr(app, "extensions", {}).get("shoal.node") if app is not None else None


def on_starting(server):
    """Start with no histogram files of an earlier run (prometheus-client multiprocess mode)."""
    path = os.environ.get(MULTIPROC_ENV)
    if path:
        shutil.rmtree(path, ignore_errors=True)
        os.makedirs(path)


def child_exit(server, worker):
    """Fold an exited worker's gauges out of /metrics.

    Imported here, not at the top: the master must not load the node's
    modules (and gRPC with them) before it forks its workers.
    """
    if os.environ.get(MULTIPROC_ENV):
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(worker.pid)
