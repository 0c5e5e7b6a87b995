"""Chat rendering with the project tokenizer and the real Qwen3 one: the video layout (timestamp text, then
vision_start + n video pads + vision_end per temporal group), tool schemas, response ids, packing; teacher views
(native / text / timestamps / no_video) and routing by domain and modality."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from conftest import make_text_sample, make_video, make_video_sample
from models.batching import pack, response_tokens, token_logprobs
from models.chat import ChatRenderer, RenderedPrompt
from models.vision import VisionLayout
from tasks.base import Sample
from teachers.routing import Route, TeacherRouter
from teachers.views import modality, view_messages

LAYOUT = VisionLayout(patch_size=8, temporal_patch_size=2, merge_size=2)
PADS_PER_GROUP = (32 // 8) * (32 // 8) // (2 * 2)  # 32x32 frames, patch 8, merge 2 -> 4 tokens per group

CALCULATOR = {
    "name": "calculator",
    "description": "Evaluate an arithmetic expression.",
    "parameters": {"type": "object", "properties": {"expression": {"type": "string"}}, "required": ["expression"]},
}
LOOKUP = {
    "name": "lookup",
    "description": "Look a key up in a named table.",
    "parameters": {"type": "object", "properties": {"key": {"type": "string"}}, "required": ["key"]},
}


_RENDERERS: dict = {}


def renderer_for(any_tokenizer, layout=LAYOUT) -> ChatRenderer:
    """One renderer per (tokenizer, layout): building one reads the 151K-entry Qwen vocabulary."""
    kind, tok, kwargs = any_tokenizer
    key = (kind, id(tok), layout)
    if key not in _RENDERERS:
        _RENDERERS[key] = ChatRenderer(tok, layout, kwargs)
    return _RENDERERS[key]


def template_text(any_tokenizer, messages, tools=None) -> str:
    """The tokenizer's own chat template on string messages (what the prompt text must decode to)."""
    _, tok, kwargs = any_tokenizer
    return tok.apply_chat_template(messages, tools=tools, tokenize=False, add_generation_prompt=True, **kwargs)


def decode(tok, ids) -> str:
    return tok.decode(ids, skip_special_tokens=False)


# ----------------------------------------------------------------------------- video prompts


@pytest.mark.parametrize("n_frames", [4, 5])
def test_video_prompt_layout_per_temporal_group(any_tokenizer, n_frames):
    _, tok, _ = any_tokenizer
    video = make_video(n_frames=n_frames, size=32, step=0.5)
    sample = make_video_sample(video, question="When is the red square visible?", system="Answer briefly.")
    prompt = renderer_for(any_tokenizer).render(sample.messages)

    # groups of tp = 2 frames; an odd count repeats the last frame; each group is stamped with its first frame
    groups = (n_frames + 1) // 2
    times = [video.timestamps[2 * g] for g in range(groups)]
    block = "".join(
        f"<{t:.1f} seconds><|vision_start|>" + "<|video_pad|>" * PADS_PER_GROUP + "<|vision_end|>" for t in times
    )
    expected = template_text(any_tokenizer, [
        {"role": "system", "content": "Answer briefly."},
        {"role": "user", "content": block + "When is the red square visible?"},
    ])
    assert decode(tok, prompt.input_ids) == expected

    start, pad, end = tok.convert_tokens_to_ids(["<|vision_start|>", "<|video_pad|>", "<|vision_end|>"])
    ids = prompt.input_ids
    starts = [i for i, x in enumerate(ids) if x == start]
    assert len(starts) == groups
    for g, s in enumerate(starts):
        assert ids[s + 1 : s + 1 + PADS_PER_GROUP] == [pad] * PADS_PER_GROUP
        assert ids[s + 1 + PADS_PER_GROUP] == end
        assert decode(tok, ids[:s]).endswith(f"<{times[g]:.1f} seconds>")
    # mm_token_type_ids: 2 exactly on video pads, 0 elsewhere (no image tokens)
    assert len(prompt.mm_token_type_ids) == len(ids)
    assert [t == 2 for t in prompt.mm_token_type_ids] == [x == pad for x in ids]
    assert set(prompt.mm_token_type_ids) == {0, 2}
    assert sum(x == pad for x in ids) == groups * PADS_PER_GROUP
    # one [1, gh, gw] grid row per group; patches: gh * gw per group, each 3 * tp * p * p values
    assert prompt.video_grid_thw.tolist() == [[1, 4, 4]] * groups
    assert tuple(prompt.pixel_values_videos.shape) == (groups * 16, 3 * 2 * 8 * 8)
    assert prompt.has_video


def test_two_videos_in_one_prompt_keep_their_order(any_tokenizer):
    _, tok, _ = any_tokenizer
    a, b = make_video(n_frames=2, size=32, seed=1, start=0.0), make_video(n_frames=2, size=32, seed=2, start=10.0)
    messages = [{"role": "user", "content": [
        {"type": "text", "text": "First:"}, {"type": "video", "video": a},
        {"type": "text", "text": "Second:"}, {"type": "video", "video": b},
    ]}]
    prompt = renderer_for(any_tokenizer).render(messages)
    text = decode(tok, prompt.input_ids)
    assert text.index("First:") < text.index("<0.0 seconds>") < text.index("Second:") < text.index("<10.0 seconds>")
    assert prompt.video_grid_thw.tolist() == [[1, 4, 4], [1, 4, 4]]
    single = renderer_for(any_tokenizer).render(make_video_sample(b).messages)
    assert torch.equal(prompt.pixel_values_videos[16:], single.pixel_values_videos)


def test_qwen3_generation_prompt_follows_template_kwargs(qwen3_tokenizer):
    messages = [{"role": "user", "content": "hi"}]
    no_think = ChatRenderer(qwen3_tokenizer, None, {"enable_thinking": False}).render(messages)
    default = ChatRenderer(qwen3_tokenizer, None).render(messages)
    assert decode(qwen3_tokenizer, no_think.input_ids).endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    assert decode(qwen3_tokenizer, default.input_ids).endswith("<|im_start|>assistant\n")
    assert no_think.pixel_values_videos is None and not no_think.has_video


def test_video_prompt_errors(any_tokenizer):
    sample = make_video_sample(make_video(n_frames=2, size=32))
    with pytest.raises(ValueError, match="no vision tower"):
        renderer_for(any_tokenizer, layout=None).render(sample.messages)
    undecoded = make_video(n_frames=2, size=32)
    undecoded.frames, undecoded.path = None, "clips/a.mp4"
    with pytest.raises(ValueError, match="clips/a.mp4"):
        renderer_for(any_tokenizer).render(make_video_sample(undecoded).messages)


# ----------------------------------------------------------------------------- tools and responses


def _tool_jsons(text: str) -> list[dict]:
    """The JSON objects between <tools> and </tools>, whatever whitespace separates them."""
    close = text.rindex("</tools>")
    body = text[text.rindex("<tools>", 0, close) + len("<tools>") : close]
    decoder, out, i = json.JSONDecoder(), [], 0
    while True:
        while i < len(body) and body[i].isspace():
            i += 1
        if i >= len(body):
            return out
        obj, i = decoder.raw_decode(body, i)
        out.append(obj)


def test_tool_schemas_appear_in_the_prompt(any_tokenizer):
    kind, tok, _ = any_tokenizer
    sample = make_text_sample("Use the calculator to compute 12 + 30.", domain="tool")
    prompt = renderer_for(any_tokenizer, layout=None).render(sample.messages, tools=[CALCULATOR, LOOKUP])
    text = decode(tok, prompt.input_ids)
    if kind == "qwen3":  # Qwen3's template lists the JSON schemas
        assert _tool_jsons(text) == [CALCULATOR, LOOKUP]
    else:  # the project template lists one signature line per tool
        assert "calculator(expression: string) Evaluate an arithmetic expression." in text
        assert "lookup(key: string) Look a key up in a named table." in text
    assert text.rindex("</tools>") < text.index("Use the calculator")
    without = renderer_for(any_tokenizer, layout=None).render(sample.messages)
    assert "<tools>" not in decode(tok, without.input_ids)


def test_encode_response_ends_with_end_of_turn(any_tokenizer):
    _, tok, _ = any_tokenizer
    r = renderer_for(any_tokenizer)
    ids = r.encode_response("[2, 6]")
    assert ids[-1] == tok.convert_tokens_to_ids("<|im_end|>") == tok.eos_token_id
    assert decode(tok, ids) == "[2, 6]<|im_end|>"
    assert r.decode_response(ids) == "[2, 6]"


TAGGED_RESPONSES = [
    '<tool_call>{"name": "calculator", "arguments": {"expression": "12 + 30"}}</tool_call>',
    "<think>\n7 + 5 = 12\n</think>\n\n12",
]


@pytest.mark.parametrize("text", TAGGED_RESPONSES)
def test_decoded_completion_keeps_tool_call_and_think_tags(any_tokenizer, text):
    """Rewards parse `<tool_call>...</tool_call>` and drop `<think>...</think>`: the decoded completion must keep them."""
    r = renderer_for(any_tokenizer)
    assert r.decode_response(r.encode_response(text)) == text


def test_project_template_renders_qwen_style_turns(project_tokenizer):
    text = project_tokenizer.apply_chat_template(
        [{"role": "system", "content": "S"}, {"role": "user", "content": "U"}], tools=[CALCULATOR],
        tokenize=False, add_generation_prompt=True,
    )
    assert text.startswith("<|im_start|>system\n")
    assert "<|im_end|>\n<|im_start|>user\nU<|im_end|>\n<|im_start|>assistant\n" in text


# ----------------------------------------------------------------------------- packing


def test_pack_left_pads_prompts_and_right_pads_responses(any_tokenizer):
    _, tok, _ = any_tokenizer
    r = renderer_for(any_tokenizer)
    prompts = [
        r.render(make_video_sample(make_video(n_frames=2, size=32, seed=3)).messages),
        r.render(make_text_sample("What is 2 + 3?").messages),
        r.render(make_video_sample(make_video(n_frames=4, size=32, seed=4), question="Where?").messages),
    ]
    responses = [r.encode_response("[0, 2]"), r.encode_response("5"), []]
    pad_id = tok.pad_token_id
    batch = pack(prompts, responses, pad_id)

    p_len = max(len(p.input_ids) for p in prompts)
    t_len = max(len(x) for x in responses)
    assert batch.prompt_len == p_len and tuple(batch.input_ids.shape) == (3, p_len + t_len)
    for i, (p, resp) in enumerate(zip(prompts, responses)):
        n = len(p.input_ids)
        row, att, types = batch.input_ids[i].tolist(), batch.attention_mask[i].tolist(), batch.mm_token_type_ids[i].tolist()
        for j in range(p_len + t_len):
            if j < p_len - n:  # left padding of the prompt
                assert (row[j], att[j], types[j]) == (pad_id, 0, 0)
            elif j < p_len:
                assert (row[j], att[j], types[j]) == (p.input_ids[j - (p_len - n)], 1, p.mm_token_type_ids[j - (p_len - n)])
            elif j - p_len < len(resp):
                assert (row[j], att[j], types[j]) == (resp[j - p_len], 1, 0)
            else:  # right padding of the response
                assert (row[j], att[j], types[j]) == (pad_id, 0, 0)
        assert batch.response_mask[i].tolist() == [1.0] * len(resp) + [0.0] * (t_len - len(resp))
    assert response_tokens(batch)[0, : len(responses[0])].tolist() == responses[0]
    # video tensors of the prompts that have video, in order; the text prompt contributes none
    assert torch.equal(batch.pixel_values_videos, torch.cat([prompts[0].pixel_values_videos, prompts[2].pixel_values_videos]))
    assert batch.video_grid_thw.tolist() == [[1, 4, 4]] * 3
    inputs = batch.model_inputs()
    assert set(inputs) == {"input_ids", "attention_mask", "mm_token_type_ids", "pixel_values_videos", "video_grid_thw"}


def test_pack_text_only_batch_and_empty_responses():
    prompts = [RenderedPrompt([5, 6, 7], [0, 0, 0]), RenderedPrompt([8], [0])]
    batch = pack(prompts, [[], []], pad_id=0)
    assert batch.input_ids.tolist() == [[5, 6, 7, 0], [0, 0, 8, 0]]
    assert batch.attention_mask.tolist() == [[1, 1, 1, 0], [0, 0, 1, 0]]
    assert batch.response_mask.tolist() == [[0.0], [0.0]]
    assert batch.pixel_values_videos is None and set(batch.model_inputs()) == {"input_ids", "attention_mask"}
    with pytest.raises(ValueError, match="2 prompts but 1 responses"):
        pack(prompts, [[1]], pad_id=0)


def test_token_logprobs_match_a_hand_log_softmax():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(2, 3, 5))
    tokens = [[0, 4, 2], [3, 3, 1]]
    got = token_logprobs(torch.tensor(logits), torch.tensor(tokens), temperature=0.5).numpy()
    for b in range(2):
        for t in range(3):
            z = logits[b, t] / 0.5
            ref = z[tokens[b][t]] - (np.log(np.sum(np.exp(z - z.max()))) + z.max())
            assert got[b, t] == pytest.approx(ref, abs=1e-5)


@pytest.mark.parametrize("grad", [False, True])
@pytest.mark.parametrize("temperature", [1.0, 0.5])
def test_token_logprobs_entropy_matches_a_hand_entropy(grad, temperature):
    """The entropy that comes with the log-prob pass (logged every step) against numpy, with a masked (-inf)
    logit and more rows than one chunk; the log-probs and their gradient are unchanged by asking for it."""
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(3, 7, 11)) * 3
    logits[0, 0, 4] = -np.inf
    tokens = torch.tensor(rng.integers(0, 11, size=(3, 7)))
    tokens[0, 0] = 0
    x = torch.tensor(logits, dtype=torch.float32, requires_grad=grad)
    logp, entropy = token_logprobs(x, tokens, temperature=temperature, return_entropy=True)
    z = logits / temperature
    p = np.exp(z - z.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    ref = -np.where(p > 0, p * np.log(np.where(p > 0, p, 1)), 0).sum(-1)
    assert np.allclose(entropy.numpy(), ref, atol=1e-5)
    assert torch.allclose(logp, token_logprobs(x, tokens, temperature=temperature), atol=0)
    if grad:
        logp.sum().backward()
        g = x.grad.clone()
        x.grad = None
        token_logprobs(x, tokens, temperature=temperature).sum().backward()
        assert torch.equal(g, x.grad)


# ----------------------------------------------------------------------------- teacher views

QUESTION = "When is the red square visible?"


def three_frame_sample() -> Sample:
    return make_video_sample(make_video(n_frames=3, size=32, step=0.5), question=QUESTION, system="Be brief.")


def test_native_view_is_the_students_prompt():
    sample = three_frame_sample()
    assert view_messages(sample, "native") == sample.messages


def test_text_view_replaces_video_with_timestamped_captions():
    sample = three_frame_sample()
    user_parts = list(sample.messages[1]["content"])
    messages = view_messages(sample, "text")
    assert messages[0] == {"role": "system", "content": "Be brief."}
    assert messages[1] == {"role": "user", "content": (
        "<0.0 seconds> frame 0 shows a red square\n"
        "<0.5 seconds> frame 1 shows a blue square\n"
        "<1.0 seconds> frame 2 shows a green square\n" + QUESTION
    )}
    # the sample itself is untouched (the student still sees pixels)
    assert sample.messages[1]["content"] == user_parts and sample.messages[1]["content"][0]["type"] == "video"
    assert sample.messages[0] == {"role": "system", "content": "Be brief."}


def test_timestamps_and_no_video_views():
    sample = three_frame_sample()
    assert view_messages(sample, "timestamps")[1]["content"] == "<0.0 seconds>\n<0.5 seconds>\n<1.0 seconds>\n" + QUESTION
    assert view_messages(sample, "no_video")[1]["content"] == QUESTION


@pytest.mark.parametrize("view", ["text", "timestamps", "no_video"])
def test_non_native_views_render_without_pixels(any_tokenizer, view):
    """A text-only teacher (no vision layout) renders these views: no video tokens, no pixel tensors."""
    _, tok, _ = any_tokenizer
    prompt = renderer_for(any_tokenizer, layout=None).render(view_messages(three_frame_sample(), view))
    assert prompt.pixel_values_videos is None and prompt.video_grid_thw is None
    assert tok.convert_tokens_to_ids("<|video_pad|>") not in prompt.input_ids
    assert set(prompt.mm_token_type_ids) == {0}
    text = decode(tok, prompt.input_ids)
    assert QUESTION in text and ("<0.5 seconds>" in text) == (view != "no_video")
    assert ("frame 1 shows a blue square" in text) == (view == "text")


def test_view_errors():
    sample = make_video_sample(make_video(n_frames=2, size=32, captions=False))
    with pytest.raises(ValueError, match="captions"):
        view_messages(sample, "text")
    assert view_messages(sample, "timestamps")[0]["content"].startswith("<0.0 seconds>\n<0.5 seconds>\n")
    with pytest.raises(ValueError, match="unknown teacher view 'captions'"):
        view_messages(sample, "captions")


# ----------------------------------------------------------------------------- routing


def _samples() -> list[Sample]:
    return [
        make_video_sample(make_video(n_frames=2, size=32), sid="v0", domain="video"),
        make_text_sample("What is 1 + 1?", sid="r0", domain="reasoning"),
        make_text_sample("Use the calculator.", sid="t0", domain="tool"),
        make_text_sample("From the captions, when is it red?", sid="v1", domain="video"),  # video domain, text only
    ]


def test_router_by_domain_and_modality_with_normalised_weights():
    router = TeacherRouter([
        Route("video_expert", domains=("video",), modalities=("video",)),
        Route("caption_expert", domains=("video",), modalities=("text",), weight=2.0),
        Route("text_expert", domains=("reasoning", "tool")),
        Route("math_expert", domains=("reasoning",), weight=3.0),
    ])
    samples = _samples()
    assert [modality(s) for s in samples] == ["video", "text", "text", "text"]
    weights = router.route(samples)
    expected = {  # by hand: matching routes' weights divided by their sum, per sample
        "video_expert": [1.0, 0.0, 0.0, 0.0],
        "caption_expert": [0.0, 0.0, 0.0, 1.0],
        "text_expert": [0.0, 0.25, 1.0, 0.0],
        "math_expert": [0.0, 0.75, 0.0, 0.0],
    }
    assert set(weights) == set(expected)
    for name, values in expected.items():
        assert weights[name].tolist() == pytest.approx(values)
    total = sum(w for w in weights.values())
    assert total.tolist() == pytest.approx([1.0] * 4)


def test_router_wildcard_route_serves_everything():
    router = TeacherRouter([Route("generalist"), Route("video_expert", domains=("video",), weight=1.0)])
    weights = router.route(_samples())
    assert weights["generalist"].tolist() == pytest.approx([0.5, 1.0, 1.0, 0.5])
    assert weights["video_expert"].tolist() == pytest.approx([0.5, 0.0, 0.0, 0.5])


def test_sample_no_teacher_serves_is_an_error_naming_it():
    router = TeacherRouter([Route("video_expert", domains=("video",), modalities=("video",)),
                            Route("text_expert", domains=("reasoning",))])
    with pytest.raises(ValueError) as err:
        router.route(_samples())
    message = str(err.value)
    assert "t0" in message and "'tool'" in message and "'text'" in message
    # a video-domain sample without video matches no route either (modality rule)
    with pytest.raises(ValueError, match="v1"):
        router.route([_samples()[3]])
    assert router.uncovered(["video", "reasoning", "tool", "code"]) == ["tool", "code"]
    with pytest.raises(ValueError):
        TeacherRouter([])
