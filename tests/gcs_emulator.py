"""gcp-storage-emulator with what it lacks of GCS and TensorStore relies on: run as its command line
(`python tests/gcs_emulator.py start --port=...`), which tests/gcs_fixtures.py does.

The emulator ignores generation preconditions, sends no `x-goog-generation` header with an object's bytes and
ignores suffix byte ranges (`bytes=-N`). TensorStore's gcs kvstore revalidates what it read with
`ifGenerationNotMatch`, expecting 304 or bytes with their generation; without either it fails ("Malformed
StorageGeneration": Orbax's OCDBT manifest writes fail at random), and its conditional writes (a bank's create-once
files, OCDBT's read-modify-write) are not conditional. It reads a zarr shard's index (at its end) with a suffix
range, which the emulator answers with the whole object, an error. Here, as on GCS: uploads, reads and deletes
honour `ifGenerationMatch` (0 = the object must not exist) with 412, reads honour `ifGenerationNotMatch` with 304
and carry `x-goog-generation`, and `bytes=-N` is the object's last N bytes. The server handles one request at a
time, so each check and its action are atomic.

Faults, for tests of transient server errors (tests/test_gcs_faults.py; the `gcs_faults` fixture): `POST /_faults`
with a rule as JSON, e.g. `{"status": 503, "count": 3, "methods": ["POST"], "match": "bank/written/", "drop":
false}`, makes the next `count` requests that match it fail: with `status` (and a JSON error body, as GCS sends),
or, with `drop`, by closing the connection without an answer. `methods` empty = any; `match` is a substring of the
request's unquoted path and query (which name the object in the requests of TensorStore and gcsfs: reads, and
uploads by `name=`). Rules apply in the order posted, each until its count is spent; `GET /_faults` lists them with
how many requests each failed, `DELETE /_faults` removes them all.
"""

from __future__ import annotations

import functools
import json
import re
import sys
from http import HTTPStatus
from urllib.parse import unquote, urlsplit

from gcp_storage_emulator.exceptions import NotFound
from gcp_storage_emulator.handlers import objects


def _query(request, key: str) -> str | None:
    values = request.query.get(key)
    return values[0] if values else None


def _generation(storage, bucket: str, name: str | None) -> str:
    """The object's generation ("0" when there is none, as GCS's preconditions count it)."""
    try:
        return str(storage.get_file_obj(bucket, name)["generation"]) if name else "0"
    except NotFound:
        return "0"


def _failed(response, status: HTTPStatus) -> None:
    response.status = status
    if status == HTTPStatus.PRECONDITION_FAILED:
        response.json({"error": {"code": 412, "message": "conditionNotMet"}})


def _upload_name(request) -> str | None:
    if "name" in request.query:
        return request.query["name"][0]
    if _query(request, "uploadType") == "multipart":
        return request.data["meta"].get("name")
    return (request.data or {}).get("name") if _query(request, "uploadType") == "resumable" else None


def _insert(insert):
    @functools.wraps(insert)
    def handler(request, response, storage, *args, **kwargs):
        want = _query(request, "ifGenerationMatch")
        if want is not None and "upload_id" not in request.query:
            if _generation(storage, request.params["bucket_name"], _upload_name(request)) != want:
                return _failed(response, HTTPStatus.PRECONDITION_FAILED)
        return insert(request, response, storage, *args, **kwargs)

    return handler


def _read_or_delete(handler_fn, *, read: bool):
    @functools.wraps(handler_fn)
    def handler(request, response, storage, *args, **kwargs):
        generation = _generation(storage, request.params["bucket_name"], request.params["object_id"])
        if generation != "0":  # a missing object is the handler's 404
            want, unwanted = _query(request, "ifGenerationMatch"), _query(request, "ifGenerationNotMatch")
            if want is not None and want != generation:
                return _failed(response, HTTPStatus.PRECONDITION_FAILED)
            if read and unwanted is not None and unwanted == generation:
                return _failed(response, HTTPStatus.NOT_MODIFIED)
        suffix = re.fullmatch(r"\s*bytes=-(\d+)\s*", request.get_header("range", "") or "")
        if read and suffix and generation != "0":  # the last N bytes (a zarr shard's index), as an explicit range
            size = len(storage.get_file(request.params["bucket_name"], request.params["object_id"]))
            headers = request._request_handler.headers
            del headers["range"]
            headers["range"] = f"bytes={max(0, size - int(suffix.group(1)))}-"
        out = handler_fn(request, response, storage, *args, **kwargs)
        if read and generation != "0":
            response["x-goog-generation"] = generation
        return out

    return handler


_RULE = {"status": 503, "count": 1, "methods": [], "match": "", "drop": False}
_faults: list[dict] = []  # the rules posted, each with "failed": how many requests it failed so far


def _reply(handler, status: int, body: dict | list) -> None:
    data = json.dumps(body).encode()
    handler.send_response(status)
    handler.send_header("Content-Type", "application/json")
    handler.send_header("Content-Length", str(len(data)))
    handler.end_headers()
    handler.wfile.write(data)


def _control(handler, method: str) -> None:
    """`/_faults`: POST adds a rule, DELETE removes them all; every answer lists the rules."""
    if method == "POST":
        rule = json.loads(server._read_raw_data(handler) or b"{}")
        if not isinstance(rule, dict) or set(rule) - set(_RULE):
            return _reply(handler, 400, {"error": {"code": 400, "message": f"a rule has keys {sorted(_RULE)}"}})
        _faults.append({**_RULE, **rule, "failed": 0})
    elif method == "DELETE":
        _faults.clear()
    _reply(handler, 200, _faults)


def _faulty(handle):
    @functools.wraps(handle)
    def router_handle(router, method):
        handler = router._request_handler
        if urlsplit(handler.path).path == "/_faults":
            return _control(handler, method)
        target = unquote(handler.path)
        rule = next((r for r in _faults if r["count"] > 0 and (not r["methods"] or method in r["methods"])
                     and r["match"] in target), None)
        if rule is None:
            return handle(router, method)
        rule["count"] -= 1
        rule["failed"] += 1
        server._read_raw_data(handler)  # the request's body: a client still sending it would miss the answer
        if rule["drop"]:
            handler.close_connection = True  # the server closes it without an answer
            return None
        return _reply(handler, rule["status"], {"error": {"code": rule["status"], "message": "injected fault"}})

    return router_handle


# Before the server module builds its routing table from these functions (`get` calls `download` by name).
objects.insert = _insert(objects.insert)
objects.download = _read_or_delete(objects.download, read=True)
objects.delete = _read_or_delete(objects.delete, read=False)

from gcp_storage_emulator import server  # noqa: E402 - it builds its routing table from the handlers patched above

server.Router.handle = _faulty(server.Router.handle)

if __name__ == "__main__":
    from gcp_storage_emulator.__main__ import main

    sys.exit(main(sys.argv[1:]))
