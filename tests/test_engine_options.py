"""Engine options are typed per backend: `rollout.engine_args` / `teachers[].engine_args` are checked against the
chosen backend's section (unknown key -> error with the closest valid key), completed with its defaults, and the
sections match the engines' constructors key for key (parsed from source: vLLM need not be installed)."""

from __future__ import annotations

import ast
import dataclasses
import inspect
from pathlib import Path

import pytest
import yaml

from cli.main import main
from rl.config import load_config
from rl.config_loader import ConfigError
from rollout.options import HFEngineOptions, ReferenceEngineOptions, VLLMEngineOptions
from teachers.options import HFTeacherOptions, VLLMTeacherOptions

REPO = Path(__file__).resolve().parents[1]
# What the trainer fills in itself (not engine_args): rollout engines get model_path and batch_size, teachers get
# their entry's name, path, view, topk, batch_size and template_kwargs; `model` is the in-process evaluator's.
TRAINER_KEYS = {"self", "model_path", "batch_size", "model", "name", "path", "view", "topk", "template_kwargs"}


def _init_keywords(path: Path, cls: str) -> dict[str, object]:
    """Keyword -> default (source text) of `cls.__init__` in `path`, read with ast (the module may not import)."""
    tree = ast.parse(path.read_text())
    node = next(n for n in ast.walk(tree) if isinstance(n, ast.ClassDef) and n.name == cls)
    init = next(n for n in node.body if isinstance(n, ast.FunctionDef) and n.name == "__init__")
    assert init.args.kwarg is None, f"{cls}.__init__ still swallows unknown keywords (**{init.args.kwarg.arg})"
    args = init.args.args
    defaults = [None] * (len(args) - len(init.args.defaults)) + list(init.args.defaults)
    return {a.arg: (ast.literal_eval(d) if d is not None else None) for a, d in zip(args, defaults)
            if a.arg not in TRAINER_KEYS}


def _section_defaults(section) -> dict[str, object]:
    out = {}
    for f in dataclasses.fields(section):
        out[f.name] = f.default if f.default is not dataclasses.MISSING else f.default_factory()
    return out


@pytest.mark.parametrize("path, cls, section", [
    ("rollout/hf_engine.py", "HFEngine", HFEngineOptions),
    ("rollout/vllm_engine.py", "VLLMEngine", VLLMEngineOptions),
    ("rollout/reference_engine.py", "ReferenceEngine", ReferenceEngineOptions),
    ("teachers/hf_teacher.py", "HFTeacher", HFTeacherOptions),
    ("teachers/vllm_teacher.py", "VLLMTeacher", VLLMTeacherOptions),
])
def test_each_section_is_its_engines_constructor(path, cls, section):
    keywords = _init_keywords(REPO / path, cls)
    defaults = _section_defaults(section)
    assert set(keywords) == set(defaults), f"{cls}: constructor {sorted(keywords)} vs section {sorted(defaults)}"
    for key, value in keywords.items():  # a mutable default is None in the signature, {} / [] in the section
        assert value == defaults[key] or (value is None and defaults[key] in ({}, [])), (cls, key)


def test_typos_in_the_30b_config_are_errors_naming_the_closest_key(capsys, monkeypatch):
    monkeypatch.chdir(REPO)
    rc = main(["check", "configs/mopd_qwen3vl_30b_a3b.yaml", "rollout.engine_args.enable_sleep_mod=true"])
    err = capsys.readouterr().err
    assert rc == 1 and "unknown key 'rollout.engine_args.enable_sleep_mod'" in err and "sleep_level" in err
    rc = main(["check", "configs/mopd_qwen3vl_30b_a3b.yaml", "teachers.0.engine_args.dtyp=x"])
    err = capsys.readouterr().err
    assert rc == 1 and "did you mean 'teachers.0.engine_args.dtype'?" in err and "(backend 'vllm')" in err
    cfg, resolved = load_config(REPO / "configs/mopd_qwen3vl_30b_a3b.yaml")
    assert cfg.rollout.engine_args["sleep_level"] == 1  # the setting the file meant (was enable_sleep_mode: ignored)
    assert resolved["teachers"][0]["engine_args"]["tensor_parallel_size"] == 2


def test_engine_args_are_completed_with_the_sections_defaults(tmp_path):
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump({"algorithm": {"advantage": "grpo", "policy_loss": "grpo"},
                                    "rollout": {"engine_args": {"dtype": "bfloat16"}},
                                    "teachers": [{"name": "t", "path": "x", "backend": "vllm"}]}))
    cfg, _ = load_config(path)
    assert cfg.rollout.engine_args == {"dtype": "bfloat16", "device": "cpu", "threads": 0}
    assert cfg.teachers[0].engine_args == _section_defaults(VLLMTeacherOptions)
    with pytest.raises(ConfigError, match=r"key 'rollout.engine_args.tensor_parallel_size'.* \(backend 'hf'\)"):
        load_config(path, ["rollout.engine_args.tensor_parallel_size=2"])  # a vLLM key under the hf engine
    with pytest.raises(ConfigError, match=r"'rollout.engine_args.sleep_level': expected one of 0, 1, 2"):
        load_config(path, ["rollout.backend=vllm", "rollout.engine_args={sleep_level: 3}"])


def test_a_user_registered_backend_is_accepted_with_its_own_typed_options(tmp_path, monkeypatch):
    from rollout import base

    monkeypatch.setattr(base, "ENGINES", base.ENGINES.copy())

    @dataclasses.dataclass
    class EchoOptions:
        loudness: int = dataclasses.field(default=1, metadata={"help": "How loud.", "ge": 0})

    @base.register_engine("echo", options=EchoOptions)
    class EchoEngine(base.RolloutEngine):
        def __init__(self, model_path=None, batch_size=64, loudness=1):
            self.loudness = loudness

    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump({"algorithm": {"advantage": "grpo", "policy_loss": "grpo"},
                                    "rollout": {"backend": "echo", "engine_args": {"loudness": 3}}}))
    cfg, _ = load_config(path)
    assert cfg.rollout.engine_args == {"loudness": 3}
    engine = base.get_engine_class("echo")(model_path="m", batch_size=2, **cfg.rollout.engine_args)
    assert engine.loudness == 3
    with pytest.raises(ConfigError, match="must be >= 0, got -1"):
        load_config(path, ["rollout.engine_args.loudness=-1"])
    with pytest.raises(ConfigError, match=r"'rollout.backend': 'ecko' is not registered .*did you mean 'echo'"):
        load_config(path, ["rollout.backend=ecko"])


def test_engines_refuse_unknown_keywords(workspace):
    from rollout.hf_engine import HFEngine

    with pytest.raises(TypeError, match="enable_sleep_mode"):
        HFEngine(model_path=str(workspace / "student"), enable_sleep_mode=True)
    assert "enable_sleep_mode" not in inspect.signature(HFEngine).parameters
