"""Deterministic tools of the example claims domain, over examples/data/claims.json."""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path
from typing import Any

DATA = Path(__file__).parent / "data" / "claims.json"
REQUIRED_DOCUMENTS = {"disability": ["DD214", "medical_report"], "education": ["DD214"]}


@cache
def _data() -> dict[str, Any]:
    return json.loads(DATA.read_text())  # type: ignore[no-any-return]


def lookup_claim(claim_id: str) -> str:
    """Look up a claim by id: benefit, status, veteran and documents on file."""
    claim = _data()["claims"].get(claim_id)
    return json.dumps(claim) if claim else f"no claim {claim_id} on file"


def lookup_veteran(veteran_id: str) -> str:
    """Look up a veteran's service record by id."""
    veteran = _data()["veterans"].get(veteran_id)
    return json.dumps(veteran) if veteran else f"no veteran {veteran_id} on file"


def list_documents(claim_id: str) -> str:
    """List the documents on file for a claim and the ones still missing."""
    claim = _data()["claims"].get(claim_id)
    if not claim:
        return f"no claim {claim_id} on file"
    needed = REQUIRED_DOCUMENTS.get(claim["benefit"], [])
    missing = [d for d in needed if d not in claim["documents"]]
    return f"on file: {', '.join(claim['documents'])}; missing: {', '.join(missing) or 'none'}"


def check_eligibility(claim_id: str) -> str:
    """Apply the benefit rules to a claim and give the finding."""
    claim = _data()["claims"].get(claim_id)
    if not claim:
        return f"no claim {claim_id} on file; eligibility cannot be assessed"
    veteran = _data()["veterans"].get(claim["veteran_id"], {})
    if veteran.get("discharge") is None:
        return (
            f"claim {claim_id}: discharge status unknown for {claim['veteran_id']}; "
            "requires human review before a decision"
        )
    if veteran["discharge"] != "honorable":
        return f"claim {claim_id}: not eligible ({veteran['discharge']} discharge)"
    return f"claim {claim_id}: eligible for {claim['benefit']} benefits"
