# gunicorn settings for an app wrapped in runner_mw.RunnerMiddleware.
#
#   RUNNER_MW_CONFIG=config/runner.yaml gunicorn -c config/gunicorn.conf.py myapp:app
#   kill -HUP <master pid>        # validate config/runner.yaml, swap it in every worker in place
#   runner-mw reload --pid-file /run/myapp.pid   # the same, refusing to signal a broken file
#
# The middleware of the app must read the same file as $RUNNER_MW_CONFIG (default
# config/runner.yaml, relative to the working directory). Reference:
# https://docs.gunicorn.org/en/stable/settings.html
import os

from runner_mw.gunicorn import *  # noqa: F403 - the hooks: on_starting, post_worker_init, child_exit, on_exit
from runner_mw.gunicorn import worker_timeout

bind = os.environ.get("RUNNER_MW_BIND", "127.0.0.1:8000")

# Threads, not processes, wait on a slow runner: a sync worker is busy for the whole upstream
# call (up to connect + read deadline), a gthread worker keeps serving other requests.
worker_class = "gthread"
workers = 2
threads = 4

# Above the slowest upstream call the config allows (connect + read deadline, plus the retry
# budget of a retrying backend), with headroom: 45 s for 2 s + 30 s, 58 s for the shipped
# runner.yaml (its knative entry may retry for 10 s more); 45 s when the file cannot be read.
# Computed once at start: after a HUP that raises a deadline, restart to follow it.
timeout = worker_timeout()
# On TERM / a restart, let a request in flight finish its upstream call.
graceful_timeout = timeout

# False: each worker imports the app after the fork, so nothing it builds is shared across
# a fork, and a worker booting after a HUP (max_requests, a crash) starts from the config the
# master validated last. Turn it on to save memory and boot time with a big app (copy-on-write):
# runner_mw supports it (no thread or connection is made before the fork), but a broken file at
# the first start then fails while importing the app, and code changes need a restart in any case.
preload_app = False

# gunicorn >= 25.1 opens a control socket at one path per user ($XDG_RUNTIME_DIR/gunicorn.ctl):
# two servers of the same user (tests, a demo beside a dev server) would take each other's.
# Older versions ignore the setting. HUP/USR2/TERM work without it.
control_socket_disable = True
