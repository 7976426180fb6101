"""The provider's Batch API (files and batches), and the request body of one chunk.

Like `client.py`, this module catches the SDK's exceptions and raises docqueue's own. The SDK is
built with `max_retries=0`: the ledger (workers/jobs/lane.py) decides what is done again.

A batch line's body is the one the online lane sends: it is built by the same langchain-openai
chat model the online client calls (`_get_request_payload`), so the provider sees the same
request, and the answer is the one the response cache keeps for that chunk.

The SDK and langchain load on first use, not on import: the submit path and the ledger import
this module for its constants and types, and a producer must not pay ~80 MB and a second of
start-up for a client it never builds.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any, Protocol

from pydantic import SecretStr

from docqueue.workers.errors import InputError
from docqueue.workers.pipelines import Prompt
from docqueue.workers.settings import Settings

if TYPE_CHECKING:
    from langchain_openai import ChatOpenAI

CHAT_ENDPOINT = "/v1/chat/completions"
LEDGER_KEY = "docq_ledger"  # batch metadata: the ledger row a provider batch belongs to
TERMINAL = frozenset({"completed", "expired", "cancelled", "failed"})


class BatchApi(Protocol):
    """What the ledger needs from a provider; batches and files are plain dicts."""

    def upload(self, filename: str, content: bytes) -> str: ...
    def create(self, file_id: str, metadata: Mapping[str, str]) -> dict[str, Any]: ...
    def retrieve(self, batch_id: str) -> dict[str, Any]: ...
    def find(self, ledger_id: int) -> dict[str, Any] | None: ...
    def cancel(self, batch_id: str) -> dict[str, Any]: ...
    def content(self, file_id: str) -> bytes: ...


class OpenAIBatchApi:
    """The Batch API of an OpenAI-compatible endpoint, through the OpenAI SDK."""

    def __init__(self, settings: Settings, base_url: str) -> None:
        import openai

        self._base_url = base_url
        self._timeout_s = settings.llm_timeout_s
        self._secret = settings.llm_api_key.get_secret_value() if settings.llm_api_key else None
        self._client = openai.OpenAI(base_url=base_url, api_key=self._secret or "no-key",
                                     max_retries=0, timeout=settings.llm_timeout_s)

    def close(self) -> None:
        self._client.close()

    def upload(self, filename: str, content: bytes) -> str:
        return str(self._call(lambda: self._client.files.create(
            file=(filename, content), purpose="batch")).id)

    def create(self, file_id: str, metadata: Mapping[str, str]) -> dict[str, Any]:
        return _plain(self._call(lambda: self._client.batches.create(
            input_file_id=file_id, endpoint="/v1/chat/completions", completion_window="24h",
            metadata=dict(metadata))))

    def retrieve(self, batch_id: str) -> dict[str, Any]:
        return _plain(self._call(lambda: self._client.batches.retrieve(batch_id)))

    def find(self, ledger_id: int) -> dict[str, Any] | None:
        """The provider batch made for ledger row `ledger_id`, if one was: read from its
        metadata, newest batches first (a crash after create is found in the latest pages)."""
        for provider_batch in self._provider_batches():
            if (provider_batch.get("metadata") or {}).get(LEDGER_KEY) == str(ledger_id):
                return provider_batch
        return None

    def _provider_batches(self) -> Iterator[dict[str, Any]]:
        page = self._call(lambda: self._client.batches.list(limit=100))
        while True:
            yield from (_plain(b) for b in page.data)
            if not page.has_next_page():
                return
            page = self._call(page.get_next_page)

    def cancel(self, batch_id: str) -> dict[str, Any]:
        return _plain(self._call(lambda: self._client.batches.cancel(batch_id)))

    def content(self, file_id: str) -> bytes:
        return bytes(self._call(lambda: self._client.files.content(file_id)).content)

    def _call(self, fn: Any) -> Any:
        import openai

        from docqueue.workers.provider.client import classify_status_error, transport_error

        try:
            return fn()
        except openai.APIStatusError as exc:
            raise classify_status_error(exc, self._secret) from None
        except (openai.APITimeoutError, openai.APIConnectionError) as exc:
            raise transport_error(exc, self._base_url, self._timeout_s, self._secret) from None


def _plain(model: Any) -> dict[str, Any]:
    return dict(model.model_dump(mode="json"))


class RequestBodies:
    """The online lane's request body for a prompt, built by the same chat model."""

    def __init__(self, settings: Settings, base_url: str) -> None:
        if settings.mode != "chat":
            raise InputError("the batch lane sends chat requests: set DOCQ_LLM_MODE=chat")
        from langchain_openai import ChatOpenAI

        self._chat: ChatOpenAI = ChatOpenAI(model=settings.model_name, base_url=base_url,
                                api_key=SecretStr("no-key"),
                                temperature=settings.llm_temperature, max_retries=0)

    def body(self, prompt: Prompt, max_tokens: int) -> dict[str, Any]:
        from docqueue.workers.provider.client import to_messages

        assert prompt.messages is not None
        kwargs: dict[str, Any] = {**(prompt.params or {}), "max_tokens": max_tokens}
        if prompt.stop:
            kwargs["stop"] = prompt.stop
        if prompt.response_format:
            kwargs["response_format"] = prompt.response_format
        payload = self._chat._get_request_payload(to_messages(prompt.messages), **kwargs)
        payload.pop("stream", None)  # a batch line is never streamed
        return dict(payload)


def line(custom_id: str, body: Mapping[str, Any]) -> bytes:
    """One line of a Batch API input file."""
    record = {"custom_id": custom_id, "method": "POST", "url": CHAT_ENDPOINT, "body": body}
    return json.dumps(record, separators=(",", ":"), ensure_ascii=False).encode() + b"\n"
