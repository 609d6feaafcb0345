"""The task API: the tutorial's custom task (docs/tutorials/your-own-task.md) runs as
written, and the built-in task's contract."""

from __future__ import annotations

import json
import os
import re

import pytest

from fedray.errors import ConfigError
from fedray.tasks import Task
from fedray.tasks.base import train_keywords
from tests.conftest import ROOT, compose, run_cli

TASK_PAGE = ROOT / "docs" / "tutorials" / "your-own-task.md"


def task_example() -> str:
    text = TASK_PAGE.read_text()
    match = re.search(r"<!-- task-example -->\n```python\n(.*?)```", text, re.S)
    assert match, f"{TASK_PAGE.relative_to(ROOT)} lost its task example"
    return match.group(1)


def test_tutorial_task_is_complete_and_short():
    code = task_example()
    assert len(code.splitlines()) < 40
    assert "class LinearTask(Task)" in code


@pytest.mark.slow
def test_tutorial_task_runs_as_written(tmp_path):
    """The exact tutorial code, launched as the tutorial says, learns (encrypted, 512-bit)."""
    (tmp_path / "mytasks.py").write_text(task_example())
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tmp_path), str(ROOT)]))
    run_dir = tmp_path / "run"
    proc = run_cli(
        [
            "task._target_=mytasks.LinearTask",
            "rounds=4",
            "num_clients=4",
            "clients_per_round=4",
            "crypto.key_bits=512",
            "crypto.allow_insecure_keys=true",
            "ray.num_cpus=2",
            "dataset.share_label_counts=true",  # sizes stay on the sites unless opted in
            f"hydra.run.dir={run_dir}",
        ],
        env=env,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["rounds_completed"] == 4 and summary["client_failures"] == 0
    assert summary["num_parameters"] == summary["num_model_parameters"] == 10
    assert summary["final_accuracy"] > 0.9  # chance is 0.5
    clients = json.loads((run_dir / "clients.json").read_text())
    assert clients["0"]["num_examples"] == 160 and clients["0"]["num_val"] == 40


class _NoProx(Task):
    def train(self, model, data, *, epochs, lr, seed):
        return {"loss": 0.0}


class _Everything(Task):
    def train(self, model, data, **kwargs):
        return kwargs


def test_train_gets_only_the_keywords_it_takes_and_refuses_a_needed_one():
    offered = {"epochs": 1, "lr": 0.1, "seed": 3, "round_num": 2, "proximal_mu": 0.0}
    assert train_keywords(_NoProx(), offered) == {"epochs": 1, "lr": 0.1, "seed": 3}
    assert train_keywords(_Everything(), offered) == offered
    with pytest.raises(ConfigError, match=r"strategy=fedprox .* accept the keyword 'proximal_mu'"):
        train_keywords(_NoProx(), {**offered, "proximal_mu": 0.1})


def test_task_target_must_be_a_task_subclass():
    from fedray.tasks import build_task

    with pytest.raises(ConfigError, match="must name a subclass of fedray.tasks.Task"):
        build_task(compose(["task._target_=collections.OrderedDict"]))
    with pytest.raises(ConfigError, match="could not be imported"):
        build_task(compose(["task._target_=nope.Nope"]))
    task = build_task(compose([f"task._target_={__name__}._NoProx", "+task.kwargs.width=3"]))
    assert isinstance(task, _NoProx) and task.kwargs == {"width": 3} and task.cfg.seed == 0


def test_a_fedprox_job_with_a_task_that_ignores_mu_stops_at_set_up():
    from fedray.runtime.client import ClientHost

    cfg = compose(
        [
            f"task._target_={__name__}._NoProx",
            "strategy=fedprox",
            "strategy.proximal_mu=0.1",
            "crypto=none",
        ]
    )
    host = ClientHost(cfg, [0], None)
    assert "accept the keyword 'proximal_mu'" in host.ready()


def test_proximal_term_is_mu_half_the_squared_distance_to_the_global_weights():
    """FedProx's term, for users' tasks too: mu/2 ||w - w0||^2 with gradient mu (w - w0),
    anchored where it is made; mu = 0 leaves the loss as it is."""
    import torch

    from fedray.tasks import ProximalTerm

    w = torch.nn.Parameter(torch.tensor([1.0, -2.0, 0.5]))
    term = ProximalTerm([w], mu=0.4)
    with torch.no_grad():
        w += torch.tensor([0.5, 1.0, -1.5])  # local training moved w away from w0
    loss = term(torch.tensor(3.0))
    assert loss.item() == pytest.approx(3.0 + 0.2 * (0.25 + 1.0 + 2.25))
    loss.backward()
    torch.testing.assert_close(w.grad, 0.4 * torch.tensor([0.5, 1.0, -1.5]))
    base = torch.tensor(3.0)
    assert ProximalTerm([w], mu=0.0)(base) is base


def test_epoch_batches_visit_every_example_once_per_epoch_in_a_replayable_order():
    import torch

    from fedray.tasks import epoch_batches

    def run(seed):
        gen = torch.Generator().manual_seed(seed)
        return [b.tolist() for b in epoch_batches(10, 4, 2, gen, torch.device("cpu"))]

    batches = run(5)
    assert [len(b) for b in batches] == [4, 4, 2, 4, 4, 2]
    assert sorted(sum(batches[:3], [])) == sorted(sum(batches[3:], [])) == list(range(10))
    assert batches[:3] != batches[3:]  # a fresh permutation each epoch
    assert run(5) == batches and run(6) != batches


@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_local_sgd_gives_torch_optim_sgds_weights_bit_for_bit(momentum):
    """The built-in task's LocalSGD is torch.optim.SGD(foreach=True)'s update, step for
    step, momentum buffers included (a parameter without a gradient is left alone)."""
    import torch

    from fedray.tasks.tabular import LocalSGD

    def model():
        torch.manual_seed(3)
        net = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
        unused = torch.nn.Linear(2, 2)  # trainable, never in the loss: no gradient
        return torch.nn.ModuleList([net, unused])

    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(40, 6, generator=gen), torch.randint(0, 3, (40,), generator=gen)
    ours, theirs = model(), model()
    opt_ours = LocalSGD(list(ours.parameters()), 0.1, momentum)
    opt_theirs = torch.optim.SGD(theirs.parameters(), lr=0.1, momentum=momentum, foreach=True)
    for step in range(6):
        batch = slice(step * 6, step * 6 + 8)
        for net, opt in ((ours, opt_ours), (theirs, opt_theirs)):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(net[0](x[batch]), y[batch]).backward()
            opt.step()
    for a, b in zip(ours.parameters(), theirs.parameters(), strict=True):
        assert torch.equal(a, b)
    assert not torch.equal(ours[0][0].weight, model()[0][0].weight)  # it trained


def test_training_the_built_in_task_does_not_load_torch_dynamo():
    """torch.optim.SGD.step() imports torch._dynamo (~1.5 s of CPU, a host's whole first
    round); the built-in task's local training must not."""
    import subprocess
    import sys

    code = (
        "import sys\n"
        "from tests.conftest import compose\n"
        "from fedray.data.datasets import dataset_info\n"
        "from fedray.tasks.base import build_task\n"
        "cfg = compose(['momentum=0.9'])\n"
        "task = build_task(cfg, dataset_info(cfg.dataset))\n"
        "model = task.build_model()\n"
        "train, _ = task.load_data(0, cfg.num_clients)\n"
        "print(task.train(model, train, epochs=1, lr=0.1, seed=1)['loss'] > 0)\n"
        "print('torch._dynamo' in sys.modules)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert out.stdout.split() == ["True", "False"], out.stderr[-2000:]
