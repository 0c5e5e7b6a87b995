"""Reward library: pure Python + numpy (never torch), so rewards run in light worker processes.

Import the public API from here; importing the package registers the built-in rewards and tools.
"""

from rewards import agent, captioning, format, reasoning, retrieval, sandbox, temporal, tools  # noqa: F401  (register)
from rewards.agent import ToolCall, parse_tool_calls, run_tool_calls
from rewards.errors import InvalidAnswer, RewardError, RewardSpecError
from rewards.format import CombinedReward, combine
from rewards.reasoning import extract_choice, extract_number, extract_yes_no
from rewards.registry import (
    BatchReward,
    FunctionReward,
    Outcome,
    detect_style,
    format_reward_table,
    get_reward,
    list_rewards,
    register_reward,
)
from rewards.sandbox import SandboxResult, network_isolation, run_python
from rewards.scorer import RewardResult, RewardScorer
from rewards.temporal import grounding_metrics, parse_intervals, temporal_iou
from rewards.text import answer_region, normalize_text, token_f1
from rewards.tools import ToolError, call_tool, get_tool, list_tools, register_tool, tool_schemas

try:  # BFCL AST reward lives in its own module (another author); it registers "bfcl_ast" when present
    from rewards import bfcl  # noqa: F401
except ModuleNotFoundError as exc:
    if exc.name != "rewards.bfcl":
        raise

__all__ = [
    "BatchReward",
    "CombinedReward",
    "FunctionReward",
    "InvalidAnswer",
    "Outcome",
    "RewardError",
    "RewardResult",
    "RewardScorer",
    "RewardSpecError",
    "SandboxResult",
    "ToolCall",
    "ToolError",
    "answer_region",
    "call_tool",
    "combine",
    "detect_style",
    "extract_choice",
    "extract_number",
    "extract_yes_no",
    "format_reward_table",
    "get_reward",
    "get_tool",
    "grounding_metrics",
    "list_rewards",
    "list_tools",
    "network_isolation",
    "normalize_text",
    "parse_intervals",
    "parse_tool_calls",
    "register_reward",
    "register_tool",
    "run_python",
    "run_tool_calls",
    "temporal_iou",
    "token_f1",
    "tool_schemas",
]
