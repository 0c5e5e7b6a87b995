"""One `Registry` behind every pluggable part: a taken name is refused (never silently replaced), lookups name
the closest name, and the config loader takes its choices from it (a user's backend is accepted)."""

from __future__ import annotations

import pytest

from core.registry import Registry, RegistryError


def test_a_taken_name_is_refused_and_the_same_object_may_register_again():
    reg: Registry = Registry("widget")

    def a():
        return 1

    def b():
        return 2

    reg.register("a", a)
    reg.register("a", a)  # a module imported twice registers the same object: fine
    with pytest.raises(ValueError, match="widget 'a' is already registered .*refusing to replace it"):
        reg.register("a", b)
    assert reg.get("a") is a
    with pytest.raises(RegistryError, match="unknown widget 'aa'; registered: a; did you mean 'a'"):
        reg.get("aa")


def test_lazy_entries_are_named_before_import_and_resolve_on_lookup():
    reg: Registry = Registry("thing")
    reg.register("dumps", "json:dumps", kind="serialiser")
    assert "dumps" in reg and reg.names() == ["dumps"] and reg.info("dumps") == {"kind": "serialiser"}
    assert reg.target("dumps") == "json:dumps"
    import json

    assert reg.get("dumps") is json.dumps
    reg.register("dumps", json.dumps)  # the object a lazy entry names is that entry, not a conflict


def _taken_names():
    """(register call, a name it already holds) for each project registry."""
    import tasks.embedded  # noqa: F401  (registers 'embedded')
    from rewards.registry import register_reward
    from rl.algorithms import register_advantage_estimator, register_logit_loss, register_policy_loss
    from rollout.base import register_engine
    from tasks.base import register_task_source
    from teachers.backends import register_teacher_backend

    return [
        (register_policy_loss, "grpo"),
        (register_advantage_estimator, "mopd"),
        (register_logit_loss, "teacher_kl"),
        (register_engine, "hf"),
        (register_teacher_backend, "vllm"),
        (register_task_source, "embedded"),
        (lambda name: register_reward(name, "one line"), "temporal_iou"),
    ]


@pytest.mark.parametrize("index", range(7))
def test_every_project_registry_refuses_a_taken_name(index):
    register, name = _taken_names()[index]

    def intruder(completion, reference):  # a valid signature for every kind
        return 0.0

    with pytest.raises(ValueError, match=f"'{name}' is already registered"):
        register(name)(intruder)


def test_the_trainer_looks_teacher_backends_up_in_the_registry(monkeypatch):
    from teachers import backends

    monkeypatch.setattr(backends, "TEACHER_BACKENDS", backends.TEACHER_BACKENDS.copy())
    assert backends.teacher_backend_target("hf") == "teachers.hf_teacher:HFTeacher"
    assert backends.teacher_backend_target("vllm") == "teachers.vllm_teacher:VLLMTeacher"  # vLLM not imported

    @backends.register_teacher_backend("my_teacher")
    class MyTeacher:
        pass

    assert backends.teacher_backend_target("my_teacher") == f"{__name__}:test_the_trainer_looks_teacher_backends_up_in_the_registry.<locals>.MyTeacher"
    with pytest.raises(KeyError, match="unknown teacher backend 'hff'.*did you mean 'hf'"):
        backends.teacher_backend_target("hff")
