"""The task data moved to :mod:`retrofit.core.data` (one loader for every part of retrofit); this module
re-exports it so that ``from retrofit.search.tasks import load_task`` keeps working."""

from retrofit.core.data import (Example, TaskDataError, available_tasks, data_dir, extract_number, load_task,
                                numbers_match)

__all__ = ["Example", "TaskDataError", "load_task", "available_tasks", "data_dir", "extract_number",
           "numbers_match"]
