"""The ``runner-mw`` command: ``check`` a config offline, ``reload`` a server, run the ``devrunner``.

Use ``runner-mw check FILE`` like ``nginx -t`` before deploying a config: exit 0
and a redacted summary (plus any warnings, on stderr), exit 1 and every error, exit 2
for usage errors.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

from runner_mw.access import config_warnings
from runner_mw.backends.registry import trial_build
from runner_mw.config import Config, redacted
from runner_mw.errors import ConfigError
from runner_mw.loader import load_config


def summary(config: Config) -> dict[str, Any]:
    """What an operator wants to see of a config, secrets shown as ``***``."""
    active = config.active
    return {
        "file": config.source,
        "sha256": config.sha256,
        "backend": active.name,
        "kind": active.kind,
        "url": active.url,
        "public_base": active.public_base,
        "timeouts": {"connect_ms": active.timeouts.connect_ms, "read_ms": active.timeouts.read_ms},
        "service_token": "***" if active.service_token else None,
        "backends": sorted(config.backends),
        "access": {
            "networks": [str(n) for n in config.access.networks],
            "tokens": ["***"] * len(config.access.tokens),
            "trusted_proxies": [str(n) for n in config.access.trusted_proxies],
            "hosts": sorted(config.access.hosts),
        },
        "warnings": config_warnings(config.access),
        "config": redacted(dict(config.data)),
    }


def cmd_check(args: argparse.Namespace) -> int:
    try:
        config = load_config(args.file)
        trial_build(config)  # as the gunicorn master will, before it takes the file
    except ConfigError as exc:
        if args.json:
            print(json.dumps({"ok": False, "errors": [i.as_dict() for i in exc.issues],
                              "summary": None}, indent=2))
        else:
            print(f"runner-mw: {args.file}: invalid configuration", file=sys.stderr)
            print(str(exc), file=sys.stderr)
        return 1
    info = summary(config)
    if args.json:
        print(json.dumps({"ok": True, "errors": [], "summary": info}, indent=2))
        return 0
    t = info["timeouts"]
    print(f"{args.file}: ok")
    print(f"  backend      {info['backend']} (kind {info['kind']})")
    print(f"  url          {info['url']}")
    print(f"  public_base  {info['public_base']}")
    print(f"  timeouts     connect {t['connect_ms']} ms, read {t['read_ms']} ms")
    print(f"  service token {'***' if info['service_token'] else '(none)'}")
    print(f"  access       networks {', '.join(info['access']['networks']) or '(none)'}; "
          f"hosts {', '.join(info['access']['hosts']) or '(IP addresses and localhost only)'}; "
          f"{len(info['access']['tokens'])} token(s)")
    print(f"  backends     {', '.join(info['backends'])}")
    for warning in info["warnings"]:  # valid, but worth a second look: exit 0 still
        print(f"runner-mw: {args.file}: warning: {warning}", file=sys.stderr)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="runner-mw", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    check = sub.add_parser("check", help="validate a config file offline (exit 0 ok, 1 invalid)")
    check.add_argument("file", help="the YAML config file")
    check.add_argument("--json", action="store_true", help="print a JSON report on stdout")
    check.set_defaults(func=cmd_check)

    from runner_mw import cli_reload

    cli_reload.register(sub)

    devrunner = sub.add_parser("devrunner", help="run the development stand-in runner")
    devrunner.add_argument("--host", default="127.0.0.1")
    devrunner.add_argument("--port", type=int, default=8085)
    devrunner.add_argument("--bundles", default=None, help="bundle folder (default: the sample)")
    devrunner.set_defaults(func=cmd_devrunner)
    return parser


def cmd_devrunner(args: argparse.Namespace) -> int:
    from runner_mw.devrunner.server import main as devrunner_main

    argv = ["--host", args.host, "--port", str(args.port)]
    if args.bundles:
        argv += ["--bundles", args.bundles]
    return devrunner_main(argv)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        result: int = args.func(args)
    except BrokenPipeError:
        # The reader left (``runner-mw check f.yaml | head -1``): not an error of ours. Python
        # would report the failed flush of stdout at exit; point stdout at nothing instead.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    return result


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
