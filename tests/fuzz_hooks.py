"""Schemathesis hooks for tests/test_api_contract.py (loaded through SCHEMATHESIS_HOOKS).

The schema can say that ``file`` is a non-empty binary, not that it decodes as a picture,
so a schema-valid case with random bytes is rightly refused (422). The hook swaps every
generated non-empty ``file`` for a real dermoscopy picture (``SLC_FUZZ_PICTURE``), so the
fuzzer's "schema-valid request accepted" check tests the fields it generates around the
picture. A case that is schema-invalid stays invalid: emptiness is the only constraint on
``file``, and an empty file is left as it is.
"""

from __future__ import annotations

import os
from pathlib import Path

import schemathesis
from schemathesis.transport.serialization import Binary

PICTURE = Path(os.environ["SLC_FUZZ_PICTURE"]).read_bytes()


@schemathesis.hook
def filter_body(ctx, body):
    """Leave out bodies with an array in a form field: multipart sends an array as repeated
    fields (none at all for an empty one), which no form parser can tell from a plain
    value, so such a "schema-violating" case reaches the server as a valid one."""
    if isinstance(body, dict):
        return not any(isinstance(v, list) for k, v in body.items() if k != "file")
    return True


@schemathesis.hook
def map_body(ctx, body):
    if isinstance(body, dict):
        file = body.get("file")
        data = file.data if isinstance(file, Binary) else file
        if isinstance(data, bytes | str) and data:
            return {**body, "file": Binary(PICTURE)}
    return body


@schemathesis.check
def only_the_picture_refused(ctx, response, case):
    """A schema-valid request refused with 422 must be refused for its picture only."""
    meta = case.meta
    if meta is None or not meta.generation.mode.is_positive:
        return None
    if response.status_code == 422 and response.json().get("error") != "invalid_image":
        raise AssertionError(
            f"schema-valid request refused with 422 for something else: {response.text}"
        )
    return None
