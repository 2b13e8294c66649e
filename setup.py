"""Packaging for runner_mw.

The JSON Schema lives at the top of the repository (``schemas/``) so that it is
easy to find and link to; it is shipped inside the package as
``runner_mw.schemas`` by mapping that sub-package onto the folder, so the
same file is found from a checkout, an editable install and a wheel.
"""

from __future__ import annotations

from pathlib import Path

from setuptools import setup

TEST_REQUIRES = [
    "pytest>=8",
    "gunicorn>=23,!=24.0.0,<28",
    "flask>=2.3",
    "pyramid>=2.0",
    "pastedeploy>=3",
    "waitress>=3",
    "gevent>=24.2",  # gunicorn's -k gevent: green sockets (tests/test_gunicorn.py)
    "hypothesis>=6.100",
    "selenium>=4.20",
    "prometheus-client>=0.20",
    "ruff>=0.6",
    "build>=1",
]

setup(
    name="runner_mw",
    version="0.1.0",
    description="WSGI middleware that puts an extension-runner gateway into any WSGI app",
    long_description=Path("README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=[
        "runner_mw",
        "runner_mw.backends",
        "runner_mw.devrunner",
        "runner_mw.schemas",
    ],
    package_dir={"runner_mw.schemas": "schemas"},
    package_data={
        "runner_mw": ["py.typed"],
        "runner_mw.schemas": ["*.json"],
        "runner_mw.devrunner": ["bundles/**/*"],
    },
    install_requires=[
        "werkzeug>=3.0",
        "requests>=2.32.4",
        # llhttp (Node.js's HTTP parser) parses the runner's replies on the hot path:
        # 7x cheaper than urllib3 per request here (runner_mw/backends/wire.py, bench/).
        "httptools>=0.6.4",
        # Serialises the checked execute envelope (the stdlib's encoder took ~12 us of it).
        "orjson>=3.10",
        "PyYAML>=6.0",
        "jsonschema>=4.18",
    ],
    extras_require={
        # The hooks in runner_mw.gunicorn replace the arbiter's HUP handling and
        # lean on gunicorn internals: this is the range they are tested with.
        "gunicorn": ["gunicorn>=23,!=24.0.0,<28"],
        "metrics": ["prometheus-client>=0.20"],
        "test": TEST_REQUIRES,
    },
    entry_points={
        "console_scripts": ["runner-mw=runner_mw.cli:main"],
        "runner_mw.backends": [
            "docker=runner_mw.backends.docker:DockerBackend",
            "knative=runner_mw.backends.knative:KnativeBackend",
        ],
        "paste.filter_app_factory": ["main=runner_mw.paste:filter_app_factory"],
    },
)
