"""The training loop's contract, with a fake task and no real model: it talks to the task only through
`forward` and `new_evaluator`, trains what the adapted model says, keeps the best evaluation, and checkpoints."""

import torch
from accelerate import Accelerator
from torch import nn
from transformers.modeling_outputs import ModelOutput

from hftl.config import TrainArgs
from hftl.outputs import CHECKPOINTS_DIR
from hftl.strategies import Adapted, count_parameters
from hftl.tasks.base import Task
from hftl.trainer import train


class Points(torch.utils.data.Dataset):
    """y = 3x - 1 on 32 fixed points."""

    def __init__(self):
        self.x = torch.linspace(-1, 1, 32).unsqueeze(1)

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return {"x": self.x[i], "y": 3 * self.x[i] - 1}


class MeanError:
    def __init__(self):
        self.errors = []

    def update(self, accelerator, batch, outputs):
        self.errors.append((outputs.prediction - batch["y"]).abs().mean().item())

    def compute(self):
        return {"neg_error": -sum(self.errors) / len(self.errors)}

    def save_artifacts(self, output_dir, prefix):
        return []


class FakeTask(Task):
    name, main_metric = "fake", "neg_error"

    def __init__(self):
        super().__init__()
        self.forward_calls, self.evaluators = 0, []

    @staticmethod
    def collate(examples):
        return {key: torch.stack([e[key] for e in examples]) for key in examples[0]}

    def forward(self, model, batch):
        self.forward_calls += 1
        prediction = model(batch["x"])
        return ModelOutput(loss=nn.functional.mse_loss(prediction, batch["y"]), prediction=prediction)

    def new_evaluator(self, id2label, processor=None):
        self.evaluators.append(MeanError())
        return self.evaluators[-1]


def test_the_loop_trains_through_the_task_and_keeps_the_best_epoch(tmp_path):
    torch.manual_seed(0)
    model = nn.Linear(1, 1)
    trainable, total = count_parameters(model)
    adapted = Adapted(model, [{"named_params": list(model.named_parameters()), "lr": 0.1}], trainable, total)
    args = TrainArgs(
        output_dir=str(tmp_path), num_epochs=4, batch_size=8, eval_batch_size=8, learning_rate=0.1, weight_decay=0.0,
        warmup_ratio=0.0, report_to="none", num_workers=0, checkpoints_total_limit=1, logging_steps=1,
    )  # fmt: skip
    task, data = FakeTask(), Points()
    result = train(task, adapted, data, data, task.collate, args, Accelerator(cpu=True), {}, "neg_error")

    assert result.state.step == 4 * 4  # 32 points / batch 8, 4 epochs
    assert task.forward_calls == 16 + 4 * 4  # every train step and every eval batch went through the task
    assert len(task.evaluators) == 4  # one fresh evaluator per evaluation
    errors = [-r["eval_neg_error"] for r in result.state.history]
    assert errors[-1] < 0.85 * errors[0], errors  # it learned (seeded: 1.60 -> 1.22)
    assert result.state.best_epoch == 1 + errors.index(min(errors))
    assert result.best_metrics["eval_neg_error"] == -min(errors)
    final = (model(Points().x) - (3 * Points().x - 1)).abs().mean().item()
    assert abs(final - min(errors)) < 1e-5  # the model holds the best epoch's weights
    assert len(list((tmp_path / CHECKPOINTS_DIR).iterdir())) == 1  # checkpoints_total_limit
