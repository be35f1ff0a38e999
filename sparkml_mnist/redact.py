"""Credentials out of everything the job writes or prints: URIs keep their shape, lose their secrets.

``s3a://KEY:SECRET@bucket/x`` -> ``s3a://***@bucket/x``; ``https://host/x?sig=abc&x=1`` ->
``https://host/x?sig=***&x=1`` (signed URLs: AWS ``X-Amz-*``, Azure SAS ``sig``/``se``/``sp``,
Google ``X-Goog-*``, and the usual token/key/secret/password names).
"""

from __future__ import annotations

import re
from typing import Any

MASK = "***"
_USERINFO = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.\-]*://)(?P<userinfo>[^/@\s?#]+)@")
_SECRET_PARAMETER = re.compile(
    r"(?P<name>[?&;](?:x-amz-[a-z-]+|x-goog-[a-z-]+|sig|signature|se|sp|sv|skoid|sktid|token|access_token|"
    r"auth|apikey|api_key|key|secret|password|passwd|pwd|credential|credentials|sas)=)(?P<value>[^&;#\s'\"]+)",
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
