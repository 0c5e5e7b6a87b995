"""What a chat template can be given: the variables it reads, from the tokenizer folder alone (no weights).

Why: `template_kwargs` reach the template as Jinja variables, and Jinja ignores a variable nobody reads, so a
typo (`enable_thinkng: false`) would change nothing without a word. `check` compares the keys with this set.
"""

from __future__ import annotations

import json
from pathlib import Path


def chat_template_source(folder: str | Path) -> str | None:
    """The template text of a saved tokenizer: `chat_template.jinja`, else `tokenizer_config.json`'s
    `chat_template` (a string, or the default of a list of named templates); None when there is none."""
    folder = Path(folder)
    jinja = folder / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8")
    config = folder / "tokenizer_config.json"
    if not config.is_file():
        return None
    template = json.loads(config.read_text(encoding="utf-8")).get("chat_template")
    if isinstance(template, list):
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default") or next(iter(named.values()), None)
    return template if isinstance(template, str) else None


def template_variables(folder: str | Path) -> set[str] | None:
    """Names the folder's chat template reads without defining them (its inputs); None without a template."""
    source = chat_template_source(folder)
    if source is None:
        return None
    from jinja2 import meta
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(extensions=["jinja2.ext.loopcontrols"])
    return set(meta.find_undeclared_variables(env.parse(source)))
