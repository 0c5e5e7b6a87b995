"""Video-RL tasks of the embedded suite (grounding, dense captioning, frame verification) and the `video_files`
source of real clips: frames agree with the answers, targets score 1 under the named rewards, wrong answers
less, stored datasets round-trip, and a real clip goes file -> prefetch -> rendered prompt."""

from __future__ import annotations

import json
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest

import rewards  # noqa: F401  (registers the built-in rewards)
from models.chat import ChatRenderer
from models.vision import VisionLayout
from rewards.registry import get_reward
from rl.data import PromptStream
from tasks.base import get_task_source
from tasks.embedded import COLOURS
from tasks.embedded_video import TASKS, EmbeddedVideoTasks, VideoFileTasks, generate, read_video_annotations
from tasks.prefetch import PrefetchingStream


def score(sample, completion: str) -> float:
    return get_reward(sample.reward)([""], [completion], [sample.reference], [sample.metadata])[0]


def visible(frame: np.ndarray, colour: str) -> bool:
    """Whether an 8x8 square of exactly this colour is in the frame (background noise stays below 40)."""
    return int((frame == np.asarray(COLOURS[colour], dtype=np.uint8)).all(-1).sum()) == 64


@pytest.mark.parametrize("task", TASKS)
def test_generation_is_deterministic_and_sized_for_the_tiny_models(task):
    a, b = generate(task, "train", 6, seed=5), generate(task, "train", 6, seed=5)
    assert [s.id for s in a] == [s.id for s in b] and [s.target for s in a] == [s.target for s in b]
    for s in a:
        video = s.videos()[0]
        assert video.frames.shape == (8, 16, 16, 3) and video.frames.dtype == np.uint8
        assert video.timestamps == [float(t) for t in range(8)] and video.fps == 1.0
        assert s.domain == "video" and s.reward in ("temporal_iou", "dense_caption", "yes_no")
    assert {s.id for s in a}.isdisjoint(s.id for s in generate(task, "eval", 6, seed=5))


def test_captioning_answers_describe_the_frames():
    for s in generate("captioning", "train", 40, seed=0):
        frames = s.videos()[0].frames
        lines = s.target.split("\n")
        assert len(lines) == len(s.reference) in (1, 2)
        for line, event in zip(lines, s.reference):
            start, end, colour = int(event["start"]), int(event["end"]), event["caption"].split()[0]
            assert line == f"[{start}, {end}] {colour} square"
            assert [visible(frames[t], colour) for t in range(8)] == [start <= t < end for t in range(8)]
        starts = [e["start"] for e in s.reference]
        assert starts == sorted(starts)


def test_verification_answers_match_the_asked_frame_and_are_balanced():
    samples = generate("verification", "train", 200, seed=0)
    for s in samples:
        t, colour = s.metadata["second"], s.metadata["colour"]
        question = s.messages[0]["content"][0]["text"]
        assert f"{colour} square visible at second {t}?" in question
        assert s.target == ("yes" if visible(s.videos()[0].frames[t], colour) else "no")
    yes = sum(s.target == "yes" for s in samples) / len(samples)
    assert 0.4 < yes < 0.6


def test_grounding_is_the_embedded_task_under_its_own_ids():
    for s in generate("grounding", "eval", 10, seed=2):
        start, end = s.reference
        colour = s.metadata["colour"]
        frames = s.videos()[0].frames
        assert s.id.startswith("vground-eval-") and s.target == f"[{int(start)}, {int(end)}]"
        assert [visible(frames[t], colour) for t in range(8)] == [start <= t < end for t in range(8)]


@pytest.mark.parametrize("task", TASKS)
def test_targets_score_one_under_their_reward(task):
    for s in generate(task, "train", 20, seed=1):
        assert score(s, s.target) == pytest.approx(1.0), (s.id, s.target)


def test_wrong_answers_score_below_one():
    caption = next(s for s in generate("captioning", "train", 20, seed=1) if len(s.reference) == 2)
    first, second = caption.target.split("\n")
    (a, b) = [(e["start"], e["end"]) for e in caption.reference]
    overlap = max(0.0, min(a[1], b[1]) - max(a[0], b[0]))
    iou = overlap / ((a[1] - a[0]) + (b[1] - b[0]) - overlap)
    # the second event is missed; the one answer still half-matches it in words ("X square" vs "Y square": F1 0.5)
    assert score(caption, first) == pytest.approx((1.0 + 0.5 * iou) / 2)
    swapped = f"[0, 8] {first.split('] ')[1]}\n[0, 8] {second.split('] ')[1]}"
    assert score(caption, swapped) < 1.0
    wrong_colour = first.replace(caption.reference[0]["caption"].split()[0], "purple")
    assert score(caption, wrong_colour) < 0.5
    verify = generate("verification", "train", 4, seed=1)[0]
    assert score(verify, "no" if verify.target == "yes" else "yes") == 0.0
    ground = generate("grounding", "train", 4, seed=1)[0]
    s, e = ground.reference
    assert score(ground, f"[{e}, {e + 2}]") < 1.0


def test_task_source_stores_and_reads_back(tmp_path):
    source = get_task_source("embedded_video")(data_dir=str(tmp_path), split="eval", n_train=4, n_eval=3, seed=9)
    assert isinstance(source, EmbeddedVideoTasks) and len(source) == 9
    expected = [s for task in TASKS for s in generate(task, "eval", 3, seed=9)]
    for got, want in zip(source, expected):
        assert (got.id, got.reward, got.target, got.reference) == (want.id, want.reward, want.target, want.reference)
        assert np.array_equal(got.videos()[0].frames, want.videos()[0].frames)
        assert got.videos()[0].captions == want.videos()[0].captions
    only = EmbeddedVideoTasks(data_dir=str(tmp_path), split="train", tasks=["verification"], n_train=4, n_eval=3,
                              seed=9, limit=2)
    assert [s.id for s in only] == ["vverify-train-0", "vverify-train-1"]
    with pytest.raises(ValueError, match="unknown task 'ocr'"):
        EmbeddedVideoTasks(data_dir=str(tmp_path), tasks=["ocr"])


def test_embedded_video_sample_renders_for_a_tiny_vision_tower(project_tokenizer):
    renderer = ChatRenderer(project_tokenizer, VisionLayout(patch_size=8, temporal_patch_size=2, merge_size=2))
    sample = generate("captioning", "train", 1, seed=0)[0]
    rendered = renderer.render(sample.messages)
    assert rendered.video_grid_thw.tolist() == [[1, 2, 2]] * 4  # 8 frames -> 4 groups of 16x16 -> 1 token each
    assert rendered.mm_token_type_ids.count(2) == 4


# ----------------------------------------------------------------------------- real video files


def write_clip(path: Path, seconds: int = 4, fps: int = 5, red_from: float = 1.0, red_to: float = 3.0) -> Path:
    """An mp4 (h264) of 64x64 frames: red while `red_from <= t < red_to`, dark otherwise."""
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width = stream.height = 64
        stream.pix_fmt = "yuv420p"
        for i in range(seconds * fps):
            t = Fraction(i, fps)
            image = np.full((64, 64, 3), 20, dtype=np.uint8)
            if red_from <= t < red_to:
                image[:] = (230, 40, 40)
            for packet in stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


@pytest.fixture()
def annotated(tmp_path) -> Path:
    (tmp_path / "clips").mkdir()
    write_clip(tmp_path / "clips" / "a.mp4")
    lines = [
        {"id": "clip-a", "video": "clips/a.mp4", "query": "the screen turns red", "window": [1, 3]},
        {"video": "clips/a.mp4", "query": "red?", "windows": [[1, 2], [2, 3]], "duration": 4},
        {"video": "clips/missing.mp4", "query": "anything", "window": [0, 1]},
    ]
    (tmp_path / "grounding.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    return tmp_path


def test_video_files_reads_annotations_by_reference(annotated):
    source = get_task_source("video_files")(path=str(annotated))  # a folder: every *.jsonl in it
    assert isinstance(source, VideoFileTasks) and len(source) == 3
    first, second, third = source
    assert first.id == "clip-a" and second.id == "grounding-2"
    video = first.videos()[0]
    assert video.frames is None and Path(video.path) == annotated / "clips" / "a.mp4"
    assert first.messages[0]["content"][0]["text"] == (
        'When does "the screen turns red" happen in the video? Answer as [start, end] in seconds.\n')
    assert first.reference == [1.0, 3.0] and first.reward == "temporal_iou" and first.target == "[1, 3]"
    assert second.reference == [[1.0, 2.0], [2.0, 3.0]] and second.metadata["duration"] == 4.0
    assert score(first, first.target) == 1.0 and score(first, "[0, 1]") == 0.0
    assert score(second, "[2, 3]") == 1.0  # best of several windows


def test_video_files_through_prefetch_to_a_rendered_prompt(annotated, project_tokenizer):
    samples = VideoFileTasks(path=str(annotated / "grounding.jsonl")).samples
    order = [s.id for s in PromptStream(samples, seed=0).next_batch(6)]
    with PrefetchingStream(PromptStream(samples, seed=0), fps=1, max_frames=8, size=(32, 32), workers=2) as stream:
        batch = stream.next_batch(4)  # needs at least 5 draws: the whole first epoch, missing clip included
        assert [s.id for s in batch] == [i for i in order if i != "grounding-3"][:4]
        assert ("grounding-3", "file not found") in stream.skipped
    decoded = batch[0]
    video = decoded.videos()[0]
    assert video.timestamps == pytest.approx([0.0, 1.0, 2.0, 3.0])
    red = [bool(f[..., 0].mean() > 150 and f[..., 1].mean() < 90) for f in video.frames]
    assert red == [False, True, True, False]  # red during [1, 3) as written
    renderer = ChatRenderer(project_tokenizer, VisionLayout(patch_size=16, temporal_patch_size=2, merge_size=2))
    rendered = renderer.render(decoded.messages)
    assert rendered.video_grid_thw.tolist() == [[1, 2, 2], [1, 2, 2]]
    text = project_tokenizer.decode(rendered.input_ids)
    assert "<0.0 seconds>" in text and "<2.0 seconds>" in text


@pytest.mark.parametrize("line,message", [
    ({"query": "q", "window": [0, 1]}, "'video'"),
    ({"video": "a.mp4", "window": [0, 1]}, "'query'"),
    ({"video": "a.mp4", "query": "q"}, "window"),
    ({"video": "a.mp4", "query": "q", "window": [3, 1]}, "start <= end"),
    ({"video": "a.mp4", "query": "q", "window": [1]}, "not \\[start, end\\]"),
])
def test_video_files_bad_lines_name_file_and_line(tmp_path, line, message):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"video": "ok.mp4", "query": "fine", "window": [0, 1]}) + "\n" + json.dumps(line) + "\n")
    with pytest.raises(ValueError, match=message) as info:
        read_video_annotations(path)
    assert f"{path}:2" in str(info.value)


def test_video_files_missing_path_is_an_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        VideoFileTasks(path=str(tmp_path / "nope.jsonl"))
    with pytest.raises(FileNotFoundError, match="no \\*.jsonl"):
        VideoFileTasks(path=str(tmp_path))
