"""Task sources: prompts with references, shared by training and evaluation."""

from tasks.base import Sample, TaskSource, VideoPart, get_task_source, register_task_source

__all__ = ["Sample", "TaskSource", "VideoPart", "get_task_source", "register_task_source"]
