"""Tasks: the code a user replaces (data loading, model, train and evaluate steps).

Subclass :class:`Task` and name it with ``task._target_=mypkg.tasks.MyTask``. The
built-in tasks are :class:`~fedray.tasks.tabular.TabularClassificationTask` (feature
vectors: ``model=mlp|logreg|cnn|custom``) and
:class:`~fedray.tasks.text.TextClassificationTask` (``model=hf``, local Hugging Face
checkpoints with LoRA).
"""

from fedray.tasks.base import ProximalTerm, Task, build_task, client_seed, epoch_batches

__all__ = ["ProximalTerm", "Task", "build_task", "client_seed", "epoch_batches"]
