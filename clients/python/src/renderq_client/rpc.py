"""The JSON-RPC 2.0 client of a renderq endpoint (SPEC §2), standard library
only: submit, status, wait, cancel, redrive, list commands."""

from __future__ import annotations

import json
import os
import time
import urllib.error
import urllib.request
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Union

JsonObject = Dict[str, Any]

#: States a job stops in.
FINAL_STATES = ("succeeded", "dead_lettered", "cancelled")


class RenderqError(Exception):
    """Anything the endpoint refused or could not do.

    ``code`` is the JSON-RPC error code (-32602 for a refused field, -32601
    for an unknown method, -32000..-32099 for server errors), or the HTTP
    status for a refusal before any JSON was read (401 for a bad token, 413
    for a body over the limit, 415). ``field`` is ``data.field`` when the
    endpoint named the offending field (``"command"``, ``"inputs[0].key"``).
    """

    def __init__(self, code: int, message: str, data: Optional[Any] = None) -> None:
        self.code = code
        self.message = message
        self.data = data
        self.field: Optional[str] = data.get("field") if isinstance(data, dict) else None
        where = f" (field {self.field})" if self.field else ""
        super().__init__(f"renderq error {code}: {message}{where}")


class Client:
    """One renderq endpoint.

    >>> client = Client("http://127.0.0.1:8080/", token_env="RENDERQ_TOKEN")
    >>> job = client.submit("render_demo", {"width": 64, "height": 36})

    ``token`` is sent as ``Authorization: Bearer``; without it, the
    environment variable ``token_env`` (``RENDERQ_TOKEN`` by default) is
    used when set.
    """

    def __init__(
        self,
        url: str,
        token: Optional[str] = None,
        token_env: str = "RENDERQ_TOKEN",
        timeout: float = 60.0,
    ) -> None:
        self.url = url if url.endswith("/") else url + "/"
        self.token = token if token is not None else os.environ.get(token_env) or None
        self.timeout = timeout
        self._next_id = 0

    # -- the wire -----------------------------------------------------------

    def call(self, method: str, params: Optional[Mapping[str, Any]] = None) -> Any:
        """Calls one method; returns its ``result`` or raises
        :class:`RenderqError`."""
        self._next_id += 1
        body = {"jsonrpc": "2.0", "id": self._next_id, "method": method, "params": dict(params or {})}
        reply = self._post(body)
        if "error" in reply:
            error = reply["error"]
            raise RenderqError(int(error.get("code", 0)), str(error.get("message", "")), error.get("data"))
        return reply.get("result")

    def _post(self, body: JsonObject) -> JsonObject:
        headers = {"Content-Type": "application/json"}
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        request = urllib.request.Request(
            self.url, data=json.dumps(body).encode(), headers=headers, method="POST"
        )
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                reply: JsonObject = json.loads(response.read())
                return reply
        except urllib.error.HTTPError as e:
            text = e.read().decode(errors="replace").strip()
            try:
                reply = json.loads(text)
                if isinstance(reply, dict) and "error" in reply:
                    return reply
            except ValueError:
                pass
            raise RenderqError(e.code, text or e.reason or f"HTTP {e.code}") from None
        except urllib.error.URLError as e:
            raise RenderqError(-32000, f"cannot reach {self.url}: {e.reason}") from None

    # -- methods ------------------------------------------------------------

    def submit(
        self,
        command: str,
        parameters: Optional[Mapping[str, Any]] = None,
        *,
        tasks: Sequence[Mapping[str, Any]] = (),
        queue: Optional[str] = None,
        frames: Optional[str] = None,
        chunk_size: Optional[int] = None,
        inputs: Sequence[Mapping[str, Any]] = (),
        notifications: Sequence[Mapping[str, Any]] = (),
        depends_on: Optional[Sequence[Mapping[str, Any]]] = None,
        **extra: Any,
    ) -> Union[str, JsonObject]:
        """Submits a job. Returns its message id, or for an array (``frames``)
        ``{"job_id", "message_ids"}``.

        ``depends_on`` (``[{"job_id", "frames": "same"|"all", "on":
        "success"|"finish"}]``) and any ``extra`` field are passed through
        as written, for endpoints that have them."""
        params: JsonObject = {"command": command, "parameters": dict(parameters or {})}
        if tasks:
            params["tasks"] = [dict(t) for t in tasks]
        if queue is not None:
            params["queue_name"] = queue
        if frames is not None:
            params["frames"] = frames
        if chunk_size is not None:
            params["chunk_size"] = chunk_size
        if inputs:
            params["inputs"] = [dict(i) for i in inputs]
        if notifications:
            params["notifications"] = [dict(n) for n in notifications]
        if depends_on is not None:
            params["depends_on"] = [dict(d) for d in depends_on]
        params.update(extra)
        result: Union[str, JsonObject] = self.call("queue_manager_submit_job", params)
        return result

    def status(self, job_id: str) -> JsonObject:
        """A job's status (``kind: "job"``: ``state``, ``progress``,
        ``outputs``, ``reason``) or an array's (``kind: "array"``: ``size``,
        ``succeeded``, ``dead_lettered``, ``cancelled``, ``running``,
        ``completed``). ``job_id`` may be a message id."""
        status: JsonObject = self.call("queue_manager_job_status", {"job_id": job_id})
        return status

    def wait(
        self,
        job_id: str,
        *,
        timeout: Optional[float] = None,
        poll: float = 1.0,
        progress: Optional[Callable[[JsonObject], None]] = None,
    ) -> JsonObject:
        """Polls until the job (or every child of the array) is final;
        returns the last status. ``progress`` is called with each status
        that differs from the one before. Raises :class:`TimeoutError` after
        ``timeout`` seconds. A job not yet in the status table (its
        ``JobSubmitted`` event still on its way) is waited for too."""
        deadline = None if timeout is None else time.monotonic() + timeout
        last: Optional[JsonObject] = None
        while True:
            try:
                status = self.status(job_id)
            except RenderqError as e:
                if e.field != "job_id" or e.code != -32602:
                    raise
                status = None
            if status is not None:
                if status != last and progress is not None:
                    progress(status)
                last = status
                if is_final(status):
                    return status
            if deadline is not None and time.monotonic() >= deadline:
                raise TimeoutError(f"job {job_id} not finished after {timeout} s: {last}")
            time.sleep(poll)

    def cancel(self, job_id: str, queue: Optional[str] = None) -> JsonObject:
        """Cancels a job, or every child of an array."""
        report: JsonObject = self.call("queue_manager_cancel_job", _control(job_id, queue))
        return report

    def redrive(self, job_id: str, queue: Optional[str] = None) -> JsonObject:
        """Sends a job's (or an array's) dead letters back to its queue.
        ``job_id`` is the job's id (``status(...)["job_id"]``) or the
        array's; returns ``{"queue", "job_id", "redriven"}``."""
        report: JsonObject = self.call("queue_manager_redrive", _control(job_id, queue))
        return report

    def list_commands(self) -> Any:
        """The commands this endpoint allows, with their parameter schemas."""
        return self.call("queue_manager_list_commands")

    def queue_stats(self, queue: Optional[str] = None) -> JsonObject:
        """Visible, in-flight and dead-lettered counts of a queue."""
        stats: JsonObject = self.call("queue_manager_queue_stats", {} if queue is None else {"queue_name": queue})
        return stats

    def monitor_url(self, job_id: str) -> str:
        """The web monitor's page of a job or an array."""
        return f"{self.url}ui/jobs/{job_id}"


def is_final(status: Mapping[str, Any]) -> bool:
    """Whether a status is final: a job in a final state, or an array whose
    children all are."""
    if status.get("kind") == "array":
        done = status.get("succeeded", 0) + status.get("dead_lettered", 0) + status.get("cancelled", 0)
        return bool(status.get("completed")) or done >= status.get("size", 0) > 0
    return status.get("state") in FINAL_STATES


def _control(job_id: str, queue: Optional[str]) -> JsonObject:
    params: JsonObject = {"job_id": job_id}
    if queue is not None:
        params["queue_name"] = queue
    return params


__all__: List[str] = ["Client", "RenderqError", "FINAL_STATES", "is_final"]
