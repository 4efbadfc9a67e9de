"""A small typed client for the native jobs API, sync (:class:`Client`) and async (:class:`AsyncClient`).

>>> with Client("http://127.0.0.1:8000") as client:
...     job, images = client.generate("a red circle", width=512, height=512, seed=1,
...                                   on_progress=lambda job: print(job.progress))

Submit, wait with a progress callback, stream events, cancel, fetch images. Only
``httpx`` is needed.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx

DEFAULT_URL = "http://127.0.0.1:8000"
TERMINAL = ("succeeded", "failed", "cancelled")



def _report(event: "JobEvent", on_progress, on_event) -> "Job | None":
    """Hand one event to the callbacks; the job state it carries, if any."""
    if on_event is not None:
        on_event(event)
    if event.job is not None and on_progress is not None:
        on_progress(event.job)
    return event.job

class KandinskyError(Exception):
    """The service refused or failed a call: its HTTP status and error body."""

    def __init__(self, status: int, kind: str, message: str, retry_after_s: float | None = None) -> None:
        super().__init__(f"{status} {kind}: {message}")
        self.status = status
        self.kind = kind
        self.message = message
        self.retry_after_s = retry_after_s


class JobFailed(KandinskyError):
    """A job ended ``failed`` or ``cancelled``."""

    def __init__(self, job: "Job") -> None:
        error = job.error or {}
        super().__init__(200, error.get("type", job.state), error.get("message", f"job {job.id} {job.state}"))
        self.job = job


@dataclass(frozen=True)
class JobImage:
    index: int
    url: str
    media_type: str | None
    seed: int


@dataclass(frozen=True)
class Job:
    """A job's state as the service last reported it."""

    id: str
    mode: str
    state: str
    stage: str | None
    step: int
    steps: int
    progress: float
    eta_s: float | None
    seeds: list[int]
    images: list[JobImage]
    error: dict | None
    raw: dict = field(repr=False, compare=False)

    @property
    def finished(self) -> bool:
        return self.state in TERMINAL

    @classmethod
    def from_view(cls, view: dict) -> "Job":
        return cls(
            id=view["id"], mode=view["mode"], state=view["state"], stage=view.get("stage"), step=view.get("step", 0),
            steps=view.get("steps", 0), progress=view.get("progress", 0.0), eta_s=view.get("eta_s"),
            seeds=list(view.get("seeds", [])), images=[JobImage(**image) for image in view.get("images", [])],
            error=view.get("error"), raw=view,
        )


@dataclass(frozen=True)
class JobEvent:
    """One Server-Sent Event: ``state`` and ``progress`` carry the job; ``preview`` a small image."""

    id: int
    event: str
    data: dict

    @property
    def job(self) -> Job | None:
        return Job.from_view(self.data) if self.event in ("state", "progress") else None


class _SseParser:
    """Lines of an event stream in, :class:`JobEvent` out."""

    def __init__(self) -> None:
        self._fields: dict[str, str] = {}

    def feed(self, line: str) -> JobEvent | None:
        if line.startswith(":"):
            return None
        if line:
            name, _, value = line.partition(":")
            self._fields[name] = value[1:] if value.startswith(" ") else value
            return None
        fields, self._fields = self._fields, {}
        if "data" not in fields:
            return None
        return JobEvent(int(fields.get("id", "0") or 0), fields.get("event", "message"), json.loads(fields["data"]))


def _raise_for(response: httpx.Response) -> None:
    if response.status_code < 400:
        return
    try:
        error = response.json()["error"]
        kind, message = error["type"], error["message"]
    except (ValueError, KeyError, TypeError):
        kind, message = "http_error", response.text[:500]
    retry = response.headers.get("retry-after")
    raise KandinskyError(response.status_code, kind, message, float(retry) if retry else None)


def _headers(api_key: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {api_key}"} if api_key else {}


def _job_body(mode: str, params: dict, preview_every: int) -> dict:
    return {"mode": mode, "params": {k: v for k, v in params.items() if v is not None}, "preview_every": preview_every}


class Client:
    """Synchronous client. ``http``: an ``httpx.Client`` to use instead of a new one."""

    def __init__(self, base_url: str = DEFAULT_URL, *, api_key: str | None = None, timeout: float = 60.0,
                 http: httpx.Client | None = None) -> None:
        self._own = http is None
        self.http = http or httpx.Client(base_url=base_url, timeout=timeout, headers=_headers(api_key))

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        if self._own:
            self.http.close()

    def submit(self, mode: str = "text2img", *, preview_every: int = 0, **params: Any) -> Job:
        """Submit a job; ``params`` is the body of ``POST /v1/{mode}``."""
        response = self.http.post("/v1/jobs", json=_job_body(mode, params, preview_every))
        _raise_for(response)
        return Job.from_view(response.json())

    def get(self, job_id: str) -> Job:
        response = self.http.get(f"/v1/jobs/{job_id}")
        _raise_for(response)
        return Job.from_view(response.json())

    def cancel(self, job_id: str) -> Job:
        response = self.http.delete(f"/v1/jobs/{job_id}")
        _raise_for(response)
        return Job.from_view(response.json())

    def events(self, job_id: str, after: int = 0) -> Iterator[JobEvent]:
        """The job's events after event ``after``, ending with the terminal one."""
        headers = {"Last-Event-ID": str(after)} if after else {}
        with self.http.stream("GET", f"/v1/jobs/{job_id}/events", headers=headers, timeout=None) as response:
            if response.status_code >= 400:
                response.read()
                _raise_for(response)
            parser = _SseParser()
            for line in response.iter_lines():
                event = parser.feed(line)
                if event is not None:
                    yield event

    def wait(self, job_id: str, on_progress: Callable[[Job], None] | None = None,
             on_event: Callable[[JobEvent], None] | None = None) -> Job:
        """Follow the job's events until it finishes; its final state. A dropped stream is
        resumed from the last event seen."""
        last = 0
        while True:
            for event in self.events(job_id, after=last):
                last = event.id
                job = _report(event, on_progress, on_event)
                if job is not None and job.finished:
                    return job
            job = self.get(job_id)
            if job.finished:
                return job

    def image(self, job_id: str, index: int = 0) -> bytes:
        response = self.http.get(f"/v1/jobs/{job_id}/images/{index}")
        _raise_for(response)
        return response.content

    def generate(self, prompt: str | None = None, *, mode: str = "text2img",
                 on_progress: Callable[[Job], None] | None = None, **params: Any) -> tuple[Job, list[bytes]]:
        """Submit, wait and fetch: the finished job and its images. Raises :class:`JobFailed`."""
        if prompt is not None:
            params["prompt"] = prompt
        job = self.submit(mode, **params)
        try:
            job = self.wait(job.id, on_progress)
        except BaseException:  # interrupted (Ctrl-C): do not leave the generation running
            try:
                self.cancel(job.id)
            except KandinskyError:
                pass
            raise
        if job.state != "succeeded":
            raise JobFailed(job)
        return job, [self.image(job.id, image.index) for image in job.images]


class AsyncClient:
    """Asynchronous client; the same calls as :class:`Client`, awaited."""

    def __init__(self, base_url: str = DEFAULT_URL, *, api_key: str | None = None, timeout: float = 60.0,
                 http: httpx.AsyncClient | None = None) -> None:
        self._own = http is None
        self.http = http or httpx.AsyncClient(base_url=base_url, timeout=timeout, headers=_headers(api_key))

    async def __aenter__(self) -> "AsyncClient":
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        if self._own:
            await self.http.aclose()

    async def submit(self, mode: str = "text2img", *, preview_every: int = 0, **params: Any) -> Job:
        response = await self.http.post("/v1/jobs", json=_job_body(mode, params, preview_every))
        _raise_for(response)
        return Job.from_view(response.json())

    async def get(self, job_id: str) -> Job:
        response = await self.http.get(f"/v1/jobs/{job_id}")
        _raise_for(response)
        return Job.from_view(response.json())

    async def cancel(self, job_id: str) -> Job:
        response = await self.http.delete(f"/v1/jobs/{job_id}")
        _raise_for(response)
        return Job.from_view(response.json())

    async def events(self, job_id: str, after: int = 0) -> AsyncIterator[JobEvent]:
        headers = {"Last-Event-ID": str(after)} if after else {}
        async with self.http.stream("GET", f"/v1/jobs/{job_id}/events", headers=headers, timeout=None) as response:
            if response.status_code >= 400:
                await response.aread()
                _raise_for(response)
            parser = _SseParser()
            async for line in response.aiter_lines():
                event = parser.feed(line)
                if event is not None:
                    yield event

    async def wait(self, job_id: str, on_progress: Callable[[Job], None] | None = None,
                   on_event: Callable[[JobEvent], None] | None = None) -> Job:
        last = 0
        while True:
            async for event in self.events(job_id, after=last):
                last = event.id
                job = _report(event, on_progress, on_event)
                if job is not None and job.finished:
                    return job
            job = await self.get(job_id)
            if job.finished:
                return job

    async def image(self, job_id: str, index: int = 0) -> bytes:
        response = await self.http.get(f"/v1/jobs/{job_id}/images/{index}")
        _raise_for(response)
        return response.content

    async def generate(self, prompt: str | None = None, *, mode: str = "text2img",
                       on_progress: Callable[[Job], None] | None = None, **params: Any) -> tuple[Job, list[bytes]]:
        if prompt is not None:
            params["prompt"] = prompt
        job = await self.submit(mode, **params)
        try:
            job = await self.wait(job.id, on_progress)
        except BaseException:  # cancelled or interrupted: stop the generation too
            try:
                await self.cancel(job.id)
            except KandinskyError:
                pass
            raise
        if job.state != "succeeded":
            raise JobFailed(job)
        return job, [await self.image(job.id, image.index) for image in job.images]


def progress_line(job: Job, width: int = 30) -> str:
    """A one-line progress bar for a terminal."""
    filled = int(round(job.progress * width))
    bar = "#" * filled + "." * (width - filled)
    stage = job.stage or job.state
    step = f" {job.step}/{job.steps}" if job.stage in ("prior", "denoise") else ""
    eta = f" ETA {job.eta_s:.1f}s" if job.eta_s is not None and not job.finished else ""
    return f"[{bar}] {job.progress * 100:5.1f}% {stage}{step}{eta}"
