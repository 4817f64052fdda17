"""Tasks: masked data modeling pretraining and the fine-tuning tasks, one module each, behind one interface."""

from imglish.tasks.base import STREAM, StepOutput, Task, TaskSampleMaker, TaskStep, get_task, list_tasks, register_task

__all__ = ["STREAM", "StepOutput", "Task", "TaskSampleMaker", "TaskStep", "get_task", "list_tasks", "register_task"]
