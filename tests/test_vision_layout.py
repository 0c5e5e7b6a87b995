"""`video_to_tensors` lays frames out exactly as the Qwen2-VL/Qwen3-VL image processor lays out a single image
(the reference the shared note recommends), groups frames in temporal patches in the same order, and a tiny
Qwen3-VL-MoE runs forward on a rendered video prompt and actually reads the pixels."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import make_video, make_video_sample
from models.vision import VisionLayout, video_to_tensors

pil_processor = pytest.importorskip("transformers.models.qwen2_vl.image_processing_pil_qwen2_vl")

QWEN3VL_MEAN = QWEN3VL_STD = [0.5, 0.5, 0.5]  # Qwen3-VL's processor normalisation (the module's constants)


def image_processor(layout: VisionLayout):
    return pil_processor.Qwen2VLImageProcessorPil(
        patch_size=layout.patch_size, temporal_patch_size=layout.temporal_patch_size, merge_size=layout.merge_size,
        do_resize=False, image_mean=QWEN3VL_MEAN, image_std=QWEN3VL_STD,
    )


def random_frames(t: int, h: int, w: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(t, h, w, 3), dtype=np.uint8)


LAYOUTS = [
    (VisionLayout(8, 2, 2), 32, 48),  # the tiny models' tower, a non-square frame (catches h/w swaps)
    (VisionLayout(14, 2, 2), 56, 28),  # Qwen2-VL / Qwen2.5-VL patch size
    (VisionLayout(16, 2, 2), 64, 32),  # Qwen3-VL patch size
    (VisionLayout(8, 2, 1), 16, 24),  # no spatial merge
]


@pytest.mark.parametrize("layout,h,w", LAYOUTS)
def test_single_frame_matches_the_image_processor(layout, h, w):
    frame = random_frames(1, h, w, seed=h + w)
    ours = video_to_tensors(frame, [0.0], layout)
    ref = image_processor(layout)(images=[frame[0]], return_tensors="np")
    assert ours.pixels.dtype == torch.float32
    assert tuple(ours.pixels.shape) == ref["pixel_values"].shape
    np.testing.assert_allclose(ours.pixels.numpy(), ref["pixel_values"], atol=1e-5)
    assert ours.grid_thw.tolist() == ref["image_grid_thw"].tolist()
    assert ours.tokens_per_group == (h // layout.patch_size) * (w // layout.patch_size) // layout.merge_size**2


@pytest.mark.parametrize("layout,h,w", LAYOUTS[:2])
def test_groups_of_repeated_frames_match_the_image_processor_per_group(layout, h, w):
    """A clip whose temporal groups each repeat one frame is, group by group, the image processor's output."""
    stills = random_frames(3, h, w, seed=7)
    clip = np.repeat(stills, layout.temporal_patch_size, axis=0)  # f0 f0 f1 f1 f2 f2
    ours = video_to_tensors(clip, [0.5 * i for i in range(len(clip))], layout)
    ref = image_processor(layout)(images=list(stills), return_tensors="np")
    np.testing.assert_allclose(ours.pixels.numpy(), ref["pixel_values"], atol=1e-5)
    assert ours.grid_thw.tolist() == ref["image_grid_thw"].tolist()  # one [1, gh, gw] row per group
    assert ours.group_times == [0.0, 1.0, 2.0]


def loop_reference(frames: np.ndarray, layout: VisionLayout) -> np.ndarray:
    """Qwen2-VL patch order by explicit loops: group -> merged row block -> merged column block -> row in block
    -> column in block; each patch flattened (channel, temporal, y, x)."""
    p, tp, m = layout.patch_size, layout.temporal_patch_size, layout.merge_size
    t = frames.shape[0]
    if t % tp:
        frames = np.concatenate([frames] + [frames[-1:]] * (tp - t % tp))
    x = (frames.astype(np.float64) / 255.0 - 0.5) / 0.5
    gh, gw = frames.shape[1] // p, frames.shape[2] // p
    rows = []
    for g in range(frames.shape[0] // tp):
        for br in range(gh // m):
            for bc in range(gw // m):
                for r in range(m):
                    for c in range(m):
                        y0, x0 = (br * m + r) * p, (bc * m + c) * p
                        values = []
                        for ch in range(3):
                            for k in range(tp):
                                for yy in range(p):
                                    for xx in range(p):
                                        values.append(x[g * tp + k, y0 + yy, x0 + xx, ch])
                        rows.append(values)
    return np.array(rows)


@pytest.mark.parametrize("n_frames", [4, 5])
def test_multi_frame_clip_matches_a_loop_reference(n_frames):
    layout = VisionLayout(4, 2, 2)
    frames = random_frames(n_frames, 8, 16, seed=n_frames)
    timestamps = [1.0 + 0.25 * i for i in range(n_frames)]
    ours = video_to_tensors(frames, timestamps, layout)
    np.testing.assert_allclose(ours.pixels.numpy(), loop_reference(frames, layout), atol=1e-5)
    groups = (n_frames + 1) // 2
    assert ours.grid_thw.tolist() == [[1, 2, 4]] * groups
    assert ours.group_times == [timestamps[2 * g] for g in range(groups)]
    assert ours.tokens_per_group == 2


def test_bad_frames_are_rejected_with_the_reason():
    layout = VisionLayout(8, 2, 2)
    with pytest.raises(ValueError, match="not a multiple of patch_size\\*merge_size = 16"):
        video_to_tensors(random_frames(2, 24, 32), [0.0, 1.0], layout)
    with pytest.raises(ValueError, match="3 timestamps for 2 frames"):
        video_to_tensors(random_frames(2, 16, 16), [0.0, 1.0, 2.0], layout)
    with pytest.raises(ValueError, match=r"\[T, H, W, 3\]"):
        video_to_tensors(random_frames(2, 16, 16)[..., 0], [0.0, 1.0], layout)


def test_tiny_qwen3_vl_moe_runs_forward_on_a_rendered_video_prompt(project_tokenizer):
    from models.batching import pack, response_logits
    from models.chat import ChatRenderer
    from models.factory import TinyModelSpec, build_model, vision_layout

    torch.manual_seed(0)
    spec = TinyModelSpec(family="qwen3_vl_moe", hidden_size=64, num_layers=1, num_heads=2, num_kv_heads=1,
                         head_dim=32, intermediate_size=64, moe_intermediate_size=32, num_experts=2, experts_per_token=1)
    model = build_model(spec, project_tokenizer, seed=0).eval()
    layout = vision_layout(model)
    assert layout == VisionLayout(8, 2, 2)
    renderer = ChatRenderer(project_tokenizer, layout)
    video = make_video(n_frames=4, size=32, seed=5)
    prompts = [
        renderer.render(make_video_sample(video).messages),
        renderer.render([{"role": "user", "content": "What is 2 + 3?"}]),
    ]
    responses = [renderer.encode_response("[0, 1]"), renderer.encode_response("5")]
    batch = pack(prompts, responses, project_tokenizer.pad_token_id)
    with torch.no_grad():
        logits = response_logits(model, batch)
    t_len = batch.response_mask.shape[1]
    assert tuple(logits.shape) == (2, t_len, model.config.text_config.vocab_size)
    assert torch.isfinite(logits).all()

    # the pixels reach the language model: other frames change the video row's logits, not the text row's
    other = video_to_tensors(255 - video.frames, video.timestamps, layout).pixels
    batch.pixel_values_videos = other
    with torch.no_grad():
        changed = response_logits(model, batch)
    assert not torch.allclose(changed[0], logits[0], atol=1e-6)
    torch.testing.assert_close(changed[1], logits[1])
