"""In-process cost of RunnerMiddleware on a request that is not its own.

Run by ``bench/run`` in a fresh interpreter::

    python -m bench.passthrough CONFIG.yaml [--number N] [--repeat R]

Times ``app(environ, start_response)`` and ``mw(environ, start_response)`` for a
``GET /hello`` environ shaped like gunicorn's, alternating the two so that both
see the same machine state, and prints one JSON line with the minimum
nanoseconds per call of each and their difference (min of runs: the least
disturbed run is the best estimate of the code's own cost).
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import timeit
from typing import Any


def _app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", "5")])
    return [b"hello"]


def _start_response(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Any:
    return None


def environ() -> dict[str, Any]:
    return {
        "REQUEST_METHOD": "GET", "SCRIPT_NAME": "", "PATH_INFO": "/hello", "QUERY_STRING": "",
        "RAW_URI": "/hello", "SERVER_PROTOCOL": "HTTP/1.1", "SERVER_NAME": "127.0.0.1",
        "SERVER_PORT": "8000", "REMOTE_ADDR": "127.0.0.1", "REMOTE_PORT": "50000",
        "HTTP_HOST": "127.0.0.1:8000", "HTTP_USER_AGENT": "wrk", "HTTP_ACCEPT": "*/*",
        "wsgi.input": io.BytesIO(b""), "wsgi.errors": sys.stderr, "wsgi.version": (1, 0),
        "wsgi.url_scheme": "http", "wsgi.multithread": True, "wsgi.multiprocess": True,
        "wsgi.run_once": False, "wsgi.input_terminated": True,
    }


def measure(config: str, number: int, repeat: int) -> dict[str, Any]:
    from runner_mw import RunnerMiddleware

    mw = RunnerMiddleware(_app, config, reload_signal=False)
    env = environ()
    bare_t = timeit.Timer("f(e, s)", globals={"f": _app, "e": env, "s": _start_response})
    mw_t = timeit.Timer("f(e, s)", globals={"f": mw, "e": env, "s": _start_response})
    bare_t.timeit(number // 10)  # warm up both
    mw_t.timeit(number // 10)
    bare, wrapped = [], []
    for _ in range(repeat):
        bare.append(bare_t.timeit(number) / number * 1e9)
        wrapped.append(mw_t.timeit(number) / number * 1e9)
    mw.close()
    return {"bare_ns": min(bare), "wrapped_ns": min(wrapped), "added_ns": min(wrapped) - min(bare),
            "number": number, "repeat": repeat}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config")
    parser.add_argument("--number", type=int, default=200_000)
    parser.add_argument("--repeat", type=int, default=15)
    args = parser.parse_args(argv)
    print(json.dumps(measure(args.config, args.number, args.repeat)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
