"""The suite's secrets: use these wherever a test needs a token, a cookie or a password.

``tests/conftest.py`` watches every log record of the test session and fails the run when one
of ``ALL`` shows up in a message, its arguments or its exception text (the gateway must redact
them everywhere). Subprocess logs (gunicorn) are not seen that way: tests that capture a
server's stderr grep it with ``leaked_in``.

(Not named ``secrets.py``: ``tests/`` is on ``sys.path`` and would shadow the standard
library's ``secrets``, which werkzeug imports.)
"""

from __future__ import annotations

from collections.abc import Iterable

#: A bearer token of ``access.tokens`` (at least 16 visible ASCII characters).
TEST_TOKEN = "tok-Zq8v3Lr2Wm9Xc4Np7Kd1"
#: A second accepted token, to check that every configured token is redacted.
TEST_TOKEN_2 = "tok-Hs5Bf0Jt6Ye2Ua8Rg3Vi"
#: The upstream ``x-runner-service-token`` the gateway sends (``upstream.service_token``).
TEST_SERVICE_TOKEN = "svc-Qw4Er7Ty1Ui9Op3As6Df"
#: What a client might send as its own service token (must be dropped, never logged).
TEST_CLIENT_SERVICE_TOKEN = "csvc-Mn2Bv5Cx8Zl1Kj4Hg7Fd"
#: A session cookie value a browser sends along (must never reach the runner or a log).
TEST_COOKIE = "sess-Pl0Ok9Ij8Uh7Yg6Tf5Rd"
#: A client ``Authorization`` credential that is not one of ours (dropped, never logged).
TEST_CLIENT_BEARER = "cli-Aa1Ss2Dd3Ff4Gg5Hh6Jj"
#: A password-like value (e.g. in a URL or a secret file).
TEST_PASSWORD = "pw-Xx9Cc8Vv7Bb6Nn5Mm4Ll"

ALL: tuple[str, ...] = (TEST_TOKEN, TEST_TOKEN_2, TEST_SERVICE_TOKEN, TEST_CLIENT_SERVICE_TOKEN,
                        TEST_COOKIE, TEST_CLIENT_BEARER, TEST_PASSWORD)


def leaked_in(text: str, extra: Iterable[str] = ()) -> list[str]:
    """The test secrets (and ``extra`` ones) that occur in ``text``."""
    return [s for s in (*ALL, *extra) if s and s in text]
