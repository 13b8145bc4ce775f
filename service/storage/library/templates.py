"""Workflow templates written by hand in YAML: load, check, seed a library.

A template file holds one workflow, or a list of them under `workflows:`:

```yaml
id: tpl-claim-submitted          # letters, digits, `.`, `_`, `-`
event_type: claim.submitted
intent: Handle a submitted benefit claim
goals: [The claim is recorded, ...]
data_summary: claim_id veteran_id benefit   # words of the event data it fits (optional)
steps:
  - {id: s1, title: Take in the claim, description: ..., agents: [intake]}
  - {id: s2, title: ..., depends_on: [s1], agents: [eligibility_analyst]}
```
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from nodes.agents import AgentRegistry
from nodes.models import PlanDraft, SimilarWorkflow, Step, format_validation_error, utcnow
from nodes.planning import check_plan
from service.errors import TemplateError

__all__ = ["load_templates", "seed_library"]


class _TemplateStep(BaseModel):
    model_config = ConfigDict(extra="forbid")

    id: str = Field(min_length=1)
    title: str = Field(min_length=1)
    description: str = ""
    depends_on: list[str] = Field(default_factory=list)
    agents: list[str] = Field(min_length=1)


class _Template(BaseModel):
    model_config = ConfigDict(extra="forbid")

    id: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    event_type: str = Field(min_length=1)
    intent: str = Field(min_length=1)
    goals: list[str] = Field(default_factory=list)
    steps: list[_TemplateStep] = Field(min_length=1)
    summary: str = ""
    data_summary: str = ""
    quality: float = Field(default=1.0, ge=0, le=1)


def _template_files(path: Path) -> list[Path]:
    if path.is_dir():
        files = sorted([*path.glob("*.yaml"), *path.glob("*.yml")])
        if not files:
            raise TemplateError(f"{path} holds no workflow templates (*.yaml)")
        return files
    if not path.exists():
        raise TemplateError(f"workflow template {path} does not exist")
    return [path]


def _check_template(template: _Template, where: str, registry: AgentRegistry | None) -> None:
    ids = [s.id for s in template.steps]
    if dupes := sorted({i for i in ids if ids.count(i) > 1}):
        raise TemplateError(f"{where}: step id(s) {', '.join(dupes)} appear more than once")
    for step in template.steps:
        unknown = [d for d in step.depends_on if d not in ids or d == step.id]
        if unknown:
            raise TemplateError(
                f"{where}: step {step.id} depends on unknown step(s) {', '.join(unknown)}"
            )
        if registry is not None and (missing := [a for a in step.agents if a not in registry]):
            raise TemplateError(
                f"{where}: step {step.id} names agent(s) {', '.join(missing)} that the "
                f"agents file does not define (known: {', '.join(registry.names)})"
            )
    draft = PlanDraft.of(template.intent, template.goals, template.steps)
    _, problems = check_plan(draft)
    if problems:
        raise TemplateError(f"{where}: " + "; ".join(problems))


def load_templates(
    path: str | Path, registry: AgentRegistry | None = None
) -> list[SimilarWorkflow]:
    """Read workflow templates from a YAML file or every YAML file of a folder.

    Args:
        path: a template file, or a folder of them.
        registry: when given, every agent a template names must be in it.

    Raises:
        TemplateError: with a sentence naming the file, the template and the problem.
    """
    found: dict[str, SimilarWorkflow] = {}
    for file in _template_files(Path(path)):
        try:
            raw = yaml.safe_load(file.read_text())
        except OSError as exc:
            raise TemplateError(f"cannot read workflow template {file}: {exc.strerror}") from None
        except yaml.YAMLError as exc:
            raise TemplateError(f"workflow template {file} is not valid YAML: {exc}") from None
        items = raw.get("workflows", [raw]) if isinstance(raw, dict) else raw
        if not isinstance(items, list) or not items:
            raise TemplateError(
                f"{file} must hold a workflow template, or a list of them under 'workflows:'"
            )
        for number, item in enumerate(items, 1):
            where = f"{file} (workflow #{number})"
            try:
                template = _Template.model_validate(item)
            except ValidationError as exc:
                raise TemplateError(format_validation_error(exc, f"workflow in {where}")) from None
            _check_template(template, f"{file} ({template.id})", registry)
            if template.id in found:
                raise TemplateError(f"{where}: template id {template.id!r} is used twice")
            now = utcnow()
            found[template.id] = SimilarWorkflow(
                id=template.id,
                event_type=template.event_type,
                intent=template.intent,
                goals=template.goals,
                steps=[Step(**s.model_dump()) for s in template.steps],
                summary=template.summary,
                data_summary=template.data_summary,
                verdict="template",
                quality=template.quality,
                source="template",
                created_at=now,
                last_used=now,
            )
    return list(found.values())


async def seed_library(
    library: Any, path: str | Path, registry: AgentRegistry | None = None
) -> list[str]:
    """Put the templates of a file or folder into a library (same id: replaced).

    Raises:
        TemplateError: a template cannot be used; nothing is put then.
    """
    templates = load_templates(path, registry)
    return [await library.put(t) for t in templates]
