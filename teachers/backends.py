"""The teacher-backend registry: `teachers[].backend` names an entry here, hosted in the teacher actors.

The trainer asks `teacher_backend_target(name)` for the "module:Class" string its actor pool builds, so a backend
registered by a user (`register_teacher_backend("mine", options=MyOptions)` on a class) is served like the
built-in ones, and the config loader accepts its name (its choices are `TEACHER_BACKENDS.names()`).
"""

from __future__ import annotations

from typing import Any

from core.registry import Registry
from teachers.options import HFTeacherOptions, VLLMTeacherOptions

TEACHER_BACKENDS: Registry[Any] = Registry("teacher backend")
TEACHER_BACKENDS.register("hf", "teachers.hf_teacher:HFTeacher", options=HFTeacherOptions)
TEACHER_BACKENDS.register("vllm", "teachers.vllm_teacher:VLLMTeacher", options=VLLMTeacherOptions)


def register_teacher_backend(name: str, options: type | None = None):
    """Decorator on a teacher class (`score(samples, responses, shard_index)`, `vocab_signature()`). `options`:
    the dataclass of its `teachers[].engine_args` keys; None accepts any mapping."""
    info = {"options": options} if options is not None else {}
    return TEACHER_BACKENDS.register(name, **info)


def teacher_options(name: str) -> type | None:
    """The typed `teachers[].engine_args` section of backend `name` (None when it declares none)."""
    return TEACHER_BACKENDS.info(name).get("options")


def teacher_backend_target(name: str) -> str:
    """"module:Class" of backend `name`, as the actor pool builds it in the actor (nothing imported here for the
    built-ins, so the trainer process never imports vLLM)."""
    return TEACHER_BACKENDS.target(name)
