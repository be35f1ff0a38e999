"""Credentials out of everything the job writes or prints: URIs keep their shape, lose their secrets.

``s3a://KEY:SECRET@bucket/x`` -> ``s3a://***@bucket/x``; ``https://host/x?sig=abc&x=1`` ->
``https://host/x?sig=***&x=1`` (signed URLs: AWS ``X-Amz-*``, Azure SAS ``sig``/``se``/``sp``,
Google ``X-Goog-*``, and any name ending in token/secret/password/key, OAuth's ``client_secret``,
``refresh_token``, ``id_token`` included), in the query or in a ``#access_token=...`` fragment.
"""

from __future__ import annotations

import re
from typing import Any

MASK = "***"
_USERINFO = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.\-]*://)(?P<userinfo>[^/@\s?#]+)@")
# Parameter names whose value is a credential. Besides the exact names (signed URLs), any name that ends in
# token/secret/password/key/assertion: access_token, refresh_token, id_token, sessionToken, auth_token,
# client_secret, client_assertion, api_key, api-key, x-api-key, access_key, account_key...
_SECRET_NAMES = (
    r"x-amz-[a-z-]+|x-goog-[a-z-]+|sig|signature|se|sp|sv|skoid|sktid|auth|credentials?|sas|passwd|pwd|"
    r"[a-z0-9_.-]*(?:token|secret|password|assertion)|(?:[a-z0-9_.-]*[_.-])?(?:api)?key"
)
# After ``?`` (query), ``#`` (an OAuth implicit-flow fragment: ``#access_token=...``), ``&`` or ``;``.
_SECRET_PARAMETER = re.compile(
    rf"(?P<name>[?&;#](?:{_SECRET_NAMES})=)(?P<value>[^&;#\s'\"]+)",
    re.IGNORECASE,
)


def redact(text: str) -> str:
    """``text`` with user:password@ parts and secret-looking query values of any URI in it masked."""
    text = _USERINFO.sub(lambda m: f"{m.group('scheme')}{MASK}@", text)
    return _SECRET_PARAMETER.sub(lambda m: f"{m.group('name')}{MASK}", text)


def redact_all(value: Any) -> Any:
    """Every string inside a JSON-like value (dicts, lists, tuples), redacted."""
    if isinstance(value, str):
        return redact(value)
    if isinstance(value, dict):
        return {key: redact_all(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [redact_all(item) for item in value]
    return value
