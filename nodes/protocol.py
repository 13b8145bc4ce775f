"""TEMPORARY stand-in until the host branch's protocol module is merged."""

from __future__ import annotations

from typing import Any

from langchain_core.messages import BaseMessage, messages_from_dict, messages_to_dict


def messages_to_dicts(messages: list[BaseMessage]) -> list[dict[str, Any]]:
    return [{"type": d["type"], **d["data"]} for d in messages_to_dict(messages)]


def messages_from_dicts(items: list[dict[str, Any]]) -> list[BaseMessage]:
    return messages_from_dict([{"type": i["type"], "data": i} for i in items])
